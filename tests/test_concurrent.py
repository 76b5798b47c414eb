"""Layer variants trained together follow the trajectories they follow alone."""

import json

import pytest
import torch

from onelayer.checkpoint import find_checkpoint, read_meta
from onelayer.config import SamplingConfig, TrainConfig
from onelayer.errors import OneLayerError
from onelayer.models import parameter_layers
from onelayer.rollout.selfcheck import fast_engine_problem
from onelayer.training import train
from onelayer.training.concurrent import auto_concurrency, check_group, train_variants
from onelayer.variants import LayerVariants

from .tiny import joint_generations, tiny_model


def config(out, layers, **overrides):
    base = dict(model="tiny", task="toy:repeat", layers=layers, out=str(out), steps=3, prompts_per_step=3,
                group_size=4, lr=3e-2, sampling=SamplingConfig(max_new_tokens=10, engine="fast"),
                micro_batch_size=5, save_every=2, eval_every=3, eval_n=6, device="cpu")
    return TrainConfig(**{**base, **overrides})


def log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_variants_trained_together_match_solo_runs(arch, tmp_path, tokenizer):
    # two variants on one layer with different seeds, one with another learning rate, one on two layers
    specs = [("1", {}), ("1", {"seed": 5}), ("2", {"lr": 1e-2}), ("0,3", {})]
    configs = [config(tmp_path / f"v{k}", layers, **extra) for k, (layers, extra) in enumerate(specs)]
    model = tiny_model(arch)
    shared_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    results = train_variants(configs, model, tokenizer, progress=False)
    assert all(not isinstance(r, Exception) for r in results)
    # the shared weights did not move
    assert all(torch.equal(p, shared_before[n]) for n, p in model.named_parameters())
    layer_of = parameter_layers(model)
    for k, (layers, extra) in enumerate(specs):
        solo_model = tiny_model(arch)
        solo = train(config(tmp_path / f"s{k}", layers, **extra), solo_model, tokenizer, progress=False)
        together, alone = log(tmp_path / f"v{k}"), log(solo.out)
        assert [r["reward"] for r in together] == [r["reward"] for r in alone]
        for a, b in zip(together, alone, strict=True):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
            assert a["concurrent_variants"] == 4
        assert results[k].final_eval["accuracy"] == solo.final_eval["accuracy"]
        # the checkpoint holds exactly this variant's trained layers, equal to the solo run's weights
        from safetensors.torch import load_file

        mine = load_file(str(find_checkpoint(tmp_path / f"v{k}") / "trained.safetensors"))
        theirs = dict(solo_model.named_parameters())
        wanted = {int(x) for x in layers.split(",")}
        assert set(mine) == {n for n, layer in layer_of.items() if layer in wanted}
        for name, value in mine.items():
            assert torch.allclose(value, theirs[name].detach(), atol=1e-5), name
            assert not torch.equal(value, shared_before[name])  # and they trained
        assert read_meta(tmp_path / f"v{k}")["step"] == 3


def test_a_resumed_group_continues_each_variant_from_its_own_step(tmp_path, tokenizer):
    import shutil

    configs = [config(tmp_path / f"v{k}", str(k), steps=4) for k in range(2)]
    whole = train_variants(configs, tiny_model("llama"), tokenizer, progress=False)
    reference = {k: log(tmp_path / f"v{k}") for k in range(2)}
    # variant 0 left at its step-2 checkpoint (as a kill would leave it), variant 1 never started
    shutil.rmtree(tmp_path / "v1")
    shutil.rmtree(find_checkpoint(tmp_path / "v0"))
    train(config(tmp_path / "v0", "0", steps=2), tiny_model("llama"), tokenizer, progress=False)
    assert read_meta(tmp_path / "v0")["step"] == 2
    again = train_variants(configs, tiny_model("llama"), tokenizer, progress=False)
    for k in range(2):
        assert [r["reward"] for r in log(tmp_path / f"v{k}")] == [r["reward"] for r in reference[k]]
        assert again[k].final_eval["accuracy"] == whole[k].final_eval["accuracy"]
    assert [r["concurrent_variants"] for r in log(tmp_path / "v1")] == [2, 2, 1, 1]  # v0 finished first


def test_a_failing_variant_stops_alone(tmp_path, tokenizer):
    configs = [config(tmp_path / "ok", "1"), config(tmp_path / "bad", "2", lr=1e30, max_grad_norm=0.0)]
    results = train_variants(configs, tiny_model("llama"), tokenizer, progress=False)
    assert isinstance(results[1], OneLayerError) and "lower --lr" in str(results[1])
    assert not isinstance(results[0], Exception) and len(log(tmp_path / "ok")) == 3


def test_joint_rows_run_through_their_own_layer_copies(tokenizer):
    model = tiny_model("gemma2").eval()
    variants = LayerVariants(model, [(0,), (2,), (2, 3)])
    g = torch.Generator().manual_seed(1)
    for k in range(3):
        for p in (p for layer in variants.copies[k].values() for p in layer.parameters()):
            p.data += 0.05 * torch.randn(p.shape, generator=g)
    ids = torch.randint(3, 50, (6, 7))
    with torch.no_grad():
        alone = []
        for k in range(3):
            with variants.variant(k):
                alone.append(model(ids[2 * k:2 * k + 2]).logits)
        base = model(ids).logits
        with variants.joint([0, 1, 2], 2):
            joint = model(ids).logits
            variants.set_rows(2, 5)  # a chunk that starts inside a block and ends inside the next
            chunk = model(ids[2:5]).logits
    alone = torch.cat(alone)
    assert torch.equal(joint, alone)
    # another batch size may take another BLAS kernel (so not bit for bit); a row on the wrong layer copy
    # would be off by ~1e-2
    assert torch.allclose(chunk, alone[2:5], rtol=0, atol=1e-5)
    assert not torch.allclose(base, alone)
    assert torch.equal(model(ids).logits, base)  # the shared layers are back in place


def test_a_compacted_joint_batch_keeps_each_row_on_its_variant(tokenizer):
    from onelayer.rollout import FastGenerator, render_prompts

    model = tiny_model("llama")
    with torch.no_grad():  # rows end over a wide range of steps, so compactions shift the variants' boundaries
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.config.vocab_size))
        model.lm_head.bias[1] = 2.5
    variants = LayerVariants(model, [(1,), (3,), (1, 2)])
    g = torch.Generator().manual_seed(3)
    for k in range(3):
        for p in (p for layer in variants.copies[k].values() for p in layer.parameters()):
            p.data += 0.3 * torch.randn(p.shape, generator=g)
    prompts = render_prompts(tokenizer, [[{"role": "user", "content": t}] for t in ("ab", "xyz", "q")])
    generator = FastGenerator(model, tokenizer, row_hook=variants.set_rows)
    with variants.joint([0, 1, 2], 3 * 4):
        joint = generator.generate(prompts * 3, 4, 120, temperature=1.0, seeds=[3, 4, 5])
    assert generator.stats["compactions"] >= 2
    for k in range(3):
        with variants.variant(k):
            alone = FastGenerator(model, tokenizer, compact=False).generate(prompts, 4, 120, temperature=1.0,
                                                                             seeds=[3 + k])
        assert joint.texts[12 * k:12 * (k + 1)] == alone.texts, k


def test_routing_segments_of_a_compacted_batch_by_hand():
    model = tiny_model("llama")
    variants = LayerVariants(model, [(1,), (3,), (2,)])
    with variants.joint([0, 1, 2], 4):  # rows 0-3 variant 0, 4-7 variant 1, 8-11 variant 2
        assert variants.segments == [(0, 4, 0), (4, 8, 1), (8, 12, 2)]
        variants.set_rows(0, 5, [1, 2, 9, 10, 11])  # variant 1 has no row left
        assert variants.segments == [(0, 2, 0), (2, 5, 2)]
        variants.set_rows(1, 4, [0, 3, 5, 7, 8])
        assert variants.segments == [(0, 1, 0), (1, 3, 1)]
        variants.set_rows(0, 2, [0, 1, 2, 3])  # the forward covers two rows of a block that has four
        assert variants.segments == [(0, 2, 0)]
        variants.set_rows(6, 10)  # a prefill chunk of the whole batch
        assert variants.segments == [(0, 2, 1), (2, 4, 2)]


def test_compiled_joint_generation_equals_eager(tokenizer):
    eager, fused = joint_generations(tokenizer, [{"compiled": False}, {"compiled": True}])
    assert torch.equal(fused.input_ids, eager.input_ids)
    assert torch.allclose(fused.logprobs, eager.logprobs, atol=1e-5)


def test_groups_that_cannot_train_together_are_refused(tmp_path):
    with pytest.raises(OneLayerError, match="share --prompts-per-step"):
        check_group([config(tmp_path / "a", "1"), config(tmp_path / "b", "2", prompts_per_step=5)])
    with pytest.raises(OneLayerError, match="--concurrent 1"):
        check_group([config(tmp_path / "a", "1", lora_rank=4)])
    with pytest.raises(OneLayerError, match="fast rollout engine"):
        check_group([config(tmp_path / "a", "1", sampling=SamplingConfig(engine="plain"))])


def test_agent_tasks_and_non_decoder_layers_are_refused(tmp_path, tokenizer):
    with pytest.raises(OneLayerError, match="single-turn"):
        train_variants([config(tmp_path / "a", "1", task="maze:3")], tiny_model("llama"), tokenizer, progress=False)
    with pytest.raises(OneLayerError, match="decoder layers only"):
        train_variants([config(tmp_path / "a", "1,embed")], tiny_model("llama"), tokenizer, progress=False)


def test_auto_concurrency_by_hand(tmp_path, monkeypatch):
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
                                   vocab_size=100, head_dim=16)
    monkeypatch.setattr("onelayer.training.concurrent.load_config", lambda name: cfg)
    c = config(tmp_path, "1", sampling=SamplingConfig(max_new_tokens=100), prompts_per_step=2, group_size=4)
    # columns: 256 prompt + 100 new + 64 headroom -> 448; per row 3 layers x 2 x 2 heads x 16 x 2 bytes x 448
    # + 100 x 16 logits bytes = 172,032 + 1,600; 8 rows per variant
    per_variant = (3 * 2 * 2 * 16 * 2 * 448 + 1600) * 8
    assert auto_concurrency(c, int(10 * per_variant / 0.45) + 10) == 10
    assert auto_concurrency(c, 10) == 1


def test_the_joint_rollout_cache_is_kept_between_steps(tmp_path, tokenizer, monkeypatch):
    import importlib

    from onelayer.rollout.fast import DecodeState

    # as if the device had 1 byte: a solo run would free any rollout cache before its update (the module,
    # not the function the package exports under the same name)
    monkeypatch.setattr(importlib.import_module("onelayer.training.train"), "total_memory", lambda device: 1.0)
    model = tiny_model("llama")
    fast_engine_problem(model, tokenizer)  # the engine's once-a-process check builds a state of its own first
    built = []
    original = DecodeState.__init__
    monkeypatch.setattr(DecodeState, "__init__", lambda self, *a, **k: built.append(a[1]) or original(self, *a, **k))
    configs = [config(tmp_path / f"v{k}", str(k), steps=3, eval_every=0) for k in range(2)]
    train_variants(configs, model, tokenizer, progress=False)
    assert built == [2 * 3 * 4]  # one state for the 2 x 3 prompts x 4 samples, reused by all three steps


def _greedy_calls_fail(monkeypatch, fails):
    """Make the fast engine's greedy calls raise out of GPU memory where ``fails(prompts)`` (an evaluation has 6
    prompts a variant here; the engine's self-check, 2)."""
    from onelayer.rollout import FastGenerator

    original = FastGenerator.generate

    def generate(self, prompts, num_samples, max_new_tokens, temperature=1.0, *args, **kwargs):
        if temperature == 0.0 and fails(prompts):
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return original(self, prompts, num_samples, max_new_tokens, temperature, *args, **kwargs)

    monkeypatch.setattr(FastGenerator, "generate", generate)


def _evals(out):
    return [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]


def test_a_joint_evaluation_out_of_memory_is_made_in_halves(tmp_path, tokenizer, monkeypatch, capsys):
    configs = [config(tmp_path / f"a{k}", str(k), steps=3) for k in range(3)]
    reference = train_variants(configs, tiny_model("llama"), tokenizer, progress=False)
    # more than one variant's 6 eval prompts at once does not fit
    _greedy_calls_fail(monkeypatch, lambda prompts: len(prompts) > 6)
    configs = [config(tmp_path / f"b{k}", str(k), steps=3) for k in range(3)]
    results = train_variants(configs, tiny_model("llama"), tokenizer, progress=False)
    assert "out of GPU memory evaluating 3 at once; 1 of them, then the other 2" in capsys.readouterr().err
    for k in range(3):
        assert not isinstance(results[k], Exception)
        assert _evals(tmp_path / f"b{k}") == _evals(tmp_path / f"a{k}")  # greedy rows: the same answers
        assert results[k].final_eval == reference[k].final_eval


def test_a_joint_rollout_out_of_memory_names_the_group_size_and_the_runs_resume(tmp_path, tokenizer, monkeypatch):
    from onelayer.rollout import FastGenerator

    original = FastGenerator.generate
    calls = []

    def generate(self, prompts, num_samples, max_new_tokens, temperature=1.0, *args, **kwargs):
        if temperature > 0:
            calls.append(len(prompts))
            if len(calls) == 3:  # step 3's joint rollouts
                raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return original(self, prompts, num_samples, max_new_tokens, temperature, *args, **kwargs)

    monkeypatch.setattr(FastGenerator, "generate", generate)
    configs = [config(tmp_path / f"v{k}", str(k), steps=3, eval_every=0, save_every=1) for k in range(2)]
    with pytest.raises(OneLayerError, match=r"^out of GPU memory generating for 2 variants at once: rerun with a "
                       r"smaller --concurrent \(now 2, e.g. 1\) and the same --out: the runs resume from their "
                       r"checkpoints"):
        train_variants(configs, tiny_model("llama"), tokenizer, progress=False)
    assert calls == [6, 6, 6]  # 2 variants x 3 prompts a step, jointly
    assert [read_meta(tmp_path / f"v{k}")["step"] for k in range(2)] == [2, 2]


def test_a_failed_final_evaluation_costs_no_training(tmp_path, tokenizer, monkeypatch):
    configs = [config(tmp_path / f"v{k}", str(k), steps=3, eval_at_start=False) for k in range(2)]
    _greedy_calls_fail(monkeypatch, lambda prompts: len(prompts) >= 6)
    # one variant's evaluation alone does not fit: a group decodes it in one batch, so only running alone helps
    with pytest.raises(OneLayerError, match=r"^out of GPU memory evaluating .*v0 on 6 prompts, which a group decodes "
                       r"in one batch: rerun with --concurrent 1 and the same --out .*: the runs resume from their "
                       r"checkpoints$"):
        train_variants(configs, tiny_model("llama"), tokenizer, progress=False)
    # each variant's step-3 checkpoint was written before the evaluation
    assert [read_meta(tmp_path / f"v{k}")["step"] for k in range(2)] == [3, 3]
    assert not (tmp_path / "v0" / "eval.jsonl").exists()
    trained = {k: log(tmp_path / f"v{k}") for k in range(2)}
    monkeypatch.undo()
    again = train_variants(configs, tiny_model("llama"), tokenizer, progress=False)
    for k in range(2):
        assert log(tmp_path / f"v{k}") == trained[k]  # nothing trained again
        assert again[k].final_eval["step"] == 3 and [e["step"] for e in _evals(tmp_path / f"v{k}")] == [3]
    train_variants(configs, tiny_model("llama"), tokenizer, progress=False)  # once evaluated, never again
    assert all([e["step"] for e in _evals(tmp_path / f"v{k}")] == [3] for k in range(2))
    # nor when --steps was lowered since: a run past its last step gets its final evaluation once
    lowered = [config(tmp_path / f"v{k}", str(k), steps=2, eval_at_start=False) for k in range(2)]
    (tmp_path / "v0" / "eval.jsonl").unlink()
    done = train_variants(lowered, tiny_model("llama"), tokenizer, progress=False)
    assert done[0].final_eval["step"] == 3 and [e["step"] for e in _evals(tmp_path / "v0")] == [3]
    assert [e["step"] for e in _evals(tmp_path / "v1")] == [3]
    # a solo run the same way: its evaluation fails after the checkpoint, and its resume only evaluates
    solo = config(tmp_path / "solo", "1", steps=3, eval_at_start=False)
    _greedy_calls_fail(monkeypatch, lambda prompts: len(prompts) >= 6)
    with pytest.raises(OneLayerError, match="^out of GPU memory evaluating after step 3: rerun with a smaller "
                       "--generation-batch-size .* it resumes from its checkpoint at step 3"):
        train(solo, tiny_model("llama"), tokenizer, progress=False)
    assert read_meta(tmp_path / "solo")["step"] == 3 and not (tmp_path / "solo" / "eval.jsonl").exists()
    monkeypatch.undo()
    result = train(solo, tiny_model("llama"), tokenizer, progress=False)
    assert len(log(tmp_path / "solo")) == 3 and result.final_eval["step"] == 3
    train(solo, tiny_model("llama"), tokenizer, progress=False)  # once evaluated, never again
    assert [e["step"] for e in _evals(tmp_path / "solo")] == [3]
    assert [e["step"] for e in _evals(tmp_path / "solo")] == [3]
    assert result.final_eval["accuracy"] == _evals(tmp_path / "solo")[-1]["accuracy"]
