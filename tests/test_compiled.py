"""Updates through compiled decoder layers: the same trajectory, shared graphs, plain modules afterwards."""

import json

import pytest
import torch

from onelayer import compat, compiled
from onelayer.checkpoint import find_checkpoint
from onelayer.compiled import compiled_layers
from onelayer.models import decoder_layers
from onelayer.training import train

from .test_train import config
from .tiny import tiny_model


@pytest.fixture
def aot_eager(monkeypatch):
    """Graphs and autograd as Inductor gets them, without its (slow on CPU) code generation."""
    import torch._dynamo

    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def steps(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_compiled_layers_follow_the_eager_trajectory(tmp_path, tokenizer, aot_eager):
    from safetensors.torch import load_file

    runs = {}
    for compile_layers in (False, True):
        out = tmp_path / f"compiled-{compile_layers}"
        model = tiny_model("qwen3")  # q/k norms: the most a layer does among the tests' architectures
        train(config(tmp_path, out=str(out), layers="1", steps=2, compile_layers=compile_layers), model, tokenizer,
              progress=False)
        runs[compile_layers] = (steps(out), load_file(str(find_checkpoint(out) / "trained.safetensors")))
        # the layers are plain modules again (generation and checkpoints never see the compiled wrapper)
        assert all(compat.compiled_call(layer) is None for layer in decoder_layers(model)[1])
    (eager_log, eager_weights), (compiled_log, compiled_weights) = runs[False], runs[True]
    assert [r["reward"] for r in compiled_log] == [r["reward"] for r in eager_log]
    for a, b in zip(compiled_log, eager_log, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert set(compiled_weights) == set(eager_weights)
    for name, value in compiled_weights.items():
        assert torch.allclose(value, eager_weights[name], atol=1e-5), name


def test_layers_share_their_graphs(tokenizer, aot_eager):
    """Compiled layers of one kind share graphs: a trained layer elsewhere, or another batch shape, compiles
    nothing new (else a 30-layer model would compile 30 times)."""
    from torch._dynamo.utils import counters

    model = tiny_model("llama")
    layers = decoder_layers(model)[1]

    def update(trained: int, rows: int, columns: int) -> int:
        for i, layer in enumerate(layers):
            layer.requires_grad_(i == trained)
        before = counters["stats"]["unique_graphs"]
        ids = torch.randint(3, 40, (rows, columns))
        with compiled_layers(model):
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.float().square().mean().backward()
        return counters["stats"]["unique_graphs"] - before

    assert update(1, 3, 9) > 0
    update(1, 4, 11)  # sizes turn dynamic here at the latest
    assert update(2, 5, 13) == 0
    assert update(1, 2, 7) == 0
    # without the block the layers run their plain modules
    assert all(compat.compiled_call(layer) is None for layer in layers)


def test_a_failed_compilation_is_one_line_that_names_the_fix(tmp_path, tokenizer, monkeypatch):
    import torch._dynamo

    from onelayer.errors import OneLayerError

    def broken(graph, example_inputs):
        raise RuntimeError("no kernels today")

    monkeypatch.setattr(compiled, "BACKEND", broken)
    torch._dynamo.reset()
    with pytest.raises(OneLayerError, match="compiling the decoder layers failed .*no kernels today.*drop --compile-layers"):
        train(config(tmp_path, steps=1, compile_layers=True), tiny_model("llama"), tokenizer, progress=False)
    torch._dynamo.reset()
