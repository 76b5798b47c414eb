"""The fast engine's self-check: a transformers release that breaks its assumptions makes runs use
``generate`` (with one line saying why) instead of sampling wrong tokens."""

import json

import pytest
import torch

from onelayer.rollout import FastGenerator, HFGenerator, make_generator, selfcheck
from onelayer.rollout.fast import StaticKVCache
from onelayer.training import train

from .test_train import config
from .tiny import tiny_model


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch):
    monkeypatch.setattr(selfcheck, "_verdicts", {})


def _future_protocol(monkeypatch):
    """A cache protocol onelayer was not written for: update() gets an argument it does not take."""
    real = StaticKVCache.update

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        raise TypeError("StaticKVCache.update() got an unexpected keyword argument 'cache_position'")

    monkeypatch.setattr(StaticKVCache, "update", update)
    return real


def _stale_cache(monkeypatch):
    """A protocol change that fails silently: the new keys and values never reach the attention."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx not in self.keys:
            shape = (self.rows_total, key_states.shape[1], self.length, key_states.shape[-1])
            self.keys[layer_idx], self.values[layer_idx] = key_states.new_zeros(shape), value_states.new_zeros(shape)
        rows = self.keys[layer_idx][self.rows]
        return rows[:, :, :self.window], self.values[layer_idx][self.rows][:, :, :self.window]

    monkeypatch.setattr(StaticKVCache, "update", update)


@pytest.mark.parametrize("arch", ["qwen3", "gemma2", "gpt2"])
def test_the_check_passes_where_the_engine_is_right(arch, tokenizer):
    assert selfcheck.fast_engine_problem(tiny_model(arch), tokenizer, kernels=False) is None


def test_an_incompatible_cache_protocol_falls_back_to_generate_with_one_line(tokenizer, monkeypatch, capsys):
    _future_protocol(monkeypatch)
    model = tiny_model("llama")
    generator = make_generator(model, tokenizer, engine="fast", fused_kernels=False)
    assert isinstance(generator, HFGenerator)
    notice = capsys.readouterr().err.strip()
    assert len(notice.splitlines()) == 1
    assert "self-check" in notice and "TypeError" in notice and "using transformers generate" in notice


def test_a_silently_wrong_cache_is_caught_by_comparing_with_the_forward(tokenizer, monkeypatch):
    _stale_cache(monkeypatch)
    problem = selfcheck.fast_engine_problem(tiny_model("qwen3"), tokenizer, kernels=False)
    assert problem is not None and ("log-probs" in problem or "most likely" in problem)


def test_the_check_runs_once_per_process_and_kind_of_model(tokenizer, monkeypatch):
    calls = []
    real = selfcheck._check
    monkeypatch.setattr(selfcheck, "_check", lambda *a: calls.append(a) or real(*a))
    for _ in range(3):
        assert isinstance(make_generator(tiny_model("llama"), tokenizer, engine="fast", fused_kernels=False),
                          FastGenerator)
    assert len(calls) == 1
    make_generator(tiny_model("llama").to(torch.float64), tokenizer, engine="fast", fused_kernels=False)
    assert len(calls) == 2  # another dtype is another kind of model


def test_a_run_whose_fast_engine_fails_its_check_trains_with_generate(tmp_path, tokenizer, monkeypatch, capsys):
    _future_protocol(monkeypatch)
    cfg = config(tmp_path, steps=2, save_every=2)
    cfg.sampling.engine = "fast"
    result = train(cfg, tiny_model("llama"), tokenizer, progress=False)
    rows = [json.loads(line) for line in (result.out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["completion_tokens"] > 0 for r in rows)
    assert "using transformers generate for this run" in capsys.readouterr().err


def test_concurrent_variants_whose_engine_fails_its_check_train_one_at_a_time(tmp_path, tokenizer, monkeypatch,
                                                                              saved_tiny, capsys):
    from onelayer.experiments.recipes import train_and_evaluate_variants

    real = _future_protocol(monkeypatch)
    recipes = [config(tmp_path / f"l{layer}", model=str(saved_tiny), layers=str(layer), steps=1, save_every=1,
                      eval_every=1, eval_at_start=False, eval_n=4) for layer in (1, 2)]
    summaries = train_and_evaluate_variants(recipes)
    assert all(isinstance(s, dict) and s["layers"] == [layer] for s, layer in zip(summaries, (1, 2), strict=True))
    assert "one at a time instead" in capsys.readouterr().err
    # and the same runs, solo with the working engine, give the same result (the fallback changes no science)
    monkeypatch.setattr(StaticKVCache, "update", real)
    again = [config(tmp_path / f"again{layer}", model=str(saved_tiny), layers=str(layer), steps=1, save_every=1,
                    eval_every=1, eval_at_start=False, eval_n=4) for layer in (1, 2)]
    for recipe, summary in zip(again, summaries, strict=True):
        assert train(recipe, progress=False).final_eval["accuracy"] == summary["accuracy"]
