"""LoRA through the same training loop: what trains, what is saved, how it is applied."""

import pytest
import torch
from safetensors.torch import load_file

from onelayer.adapters import lora_targets, matched_rank
from onelayer.checkpoint import TENSORS, apply_checkpoint, find_checkpoint, read_meta
from onelayer.errors import OneLayerError
from onelayer.training import train

from .test_train import config, rewards
from .tiny import tiny_model


def test_matched_rank_by_hand():
    # tiny llama: hidden 32, MLP 64, 4 heads of 8, 2 KV heads -> k/v project to 16.
    # one layer: q 32*32 + k 16*32 + v 16*32 + o 32*32 + 3 * 64*32 + two norms 2*32 = 9280 parameters;
    # LoRA of rank 1 on one layer: (32+32) + (32+16) * 2 + (32+32) + (32+64) * 3 = 512, on four layers 2048.
    model = tiny_model("llama")
    assert matched_rank(model) == round(9280 / 2048) == 5
    assert matched_rank(model, layers=4) == round(4 * 9280 / 2048) == 18
    assert lora_targets(model, [2]) == [f"model.layers.2.{m}" for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def test_lora_trains_only_adapters_and_its_merged_checkpoint_reproduces_the_model(tmp_path, tokenizer):
    base = tiny_model("llama")
    model = tiny_model("llama")
    result = train(config(tmp_path, layers="1,2", lora_rank=2, lora_alpha=4.0, steps=4, lr=3e-2), model, tokenizer,
                   progress=False)
    params = dict(model.named_parameters())
    for name, p in base.named_parameters():  # frozen base weights, renamed by PEFT inside adapted modules
        adapted = name.replace(".weight", ".base_layer.weight")
        assert torch.equal(p, params[adapted] if adapted in params else params[name]), name

    tensors = load_file(str(find_checkpoint(result.out) / TENSORS))
    assert all(".lora_A." in n or ".lora_B." in n for n in tensors) and len(tensors) == 2 * 2 * 7
    assert any(t.abs().sum() > 0 for n, t in tensors.items() if ".lora_B." in n), "B must have moved from 0"
    meta = read_meta(result.out)
    # rank 2 on two layers: 2 * 2 * 512 parameters (see test_matched_rank_by_hand)
    assert meta["trainable_parameters"] == result.costs["trainable_parameters"] == 2048
    assert meta["adapter"]["scaling"] == 2.0 and meta["adapter"]["rank"] == 2
    # AdamW keeps two float32 moments per trained parameter (plus a step counter per tensor)
    assert 2 * 2048 * 4 <= result.costs["optimizer_state_bytes"] <= 2 * 2048 * 4 + 28 * 8

    ids = torch.tensor([[5, 9, 14, 3, 22, 7]])
    apply_checkpoint(base, result.out)  # a plain model: the adapters are merged into its weights
    with torch.no_grad():
        assert torch.allclose(base(ids).logits, model(ids).logits, atol=1e-5)


def test_lora_resume_repeats_exactly(tmp_path, tokenizer):
    whole = train(config(tmp_path / "a", lora_rank=2, steps=4, save_every=2), tiny_model("llama"), tokenizer,
                  progress=False)
    train(config(tmp_path / "b", lora_rank=2, steps=2, save_every=2), tiny_model("llama"), tokenizer, progress=False)
    resumed = train(config(tmp_path / "b", lora_rank=2, steps=4, save_every=2), tiny_model("llama"), tokenizer,
                    progress=False)
    assert rewards(whole.out) == rewards(resumed.out)
    a, b = (load_file(str(find_checkpoint(r.out) / TENSORS)) for r in (whole, resumed))
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_lora_errors(tmp_path, tokenizer):
    with pytest.raises(OneLayerError, match="not head"):
        train(config(tmp_path, layers="3,head", lora_rank=2), tiny_model("llama"), tokenizer, progress=False)
    with pytest.raises(OneLayerError, match="--lora-rank must be >= 0"):
        train(config(tmp_path, lora_rank=-1), tiny_model("llama"), tokenizer, progress=False)
