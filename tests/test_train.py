import importlib
import json
import math

import pytest
import torch

from onelayer.checkpoint import TENSORS, find_checkpoint, read_meta
from onelayer.config import SamplingConfig, TrainConfig
from onelayer.errors import OneLayerError
from onelayer.models import parameter_layers
from onelayer.tasks.toy import RepeatTask
from onelayer.training import train
from onelayer.training.setup import PromptSampler
from onelayer.training.step import lr_factor

from .tiny import tiny_model


def config(tmp_path, **overrides):
    base = dict(model="tiny", task="toy:repeat", layers="3", out=str(tmp_path / "run"), steps=8, prompts_per_step=4,
                group_size=8, lr=3e-2, sampling=SamplingConfig(max_new_tokens=12), micro_batch_size=16, save_every=4,
                device="cpu")
    return TrainConfig(**{**base, **overrides})


def rewards(run_dir):
    return [json.loads(line)["reward"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_layer_3_training_changes_exactly_layer_3_and_the_reward_rises(tmp_path, tokenizer):
    model, before = tiny_model("llama"), tiny_model("llama")
    result = train(config(tmp_path), model, tokenizer, progress=False)
    layer_of = parameter_layers(model)
    after = dict(model.named_parameters())
    for name, p in before.named_parameters():
        if layer_of[name] == 3:
            assert not torch.equal(p, after[name]), f"{name} should have changed"
        else:
            assert torch.equal(p, after[name]), f"{name} must stay bit-identical"
    r = rewards(result.out)
    assert len(r) == 8
    assert sum(r[-2:]) / 2 > 3 * r[0] and r[-1] > 0.25


def test_checkpoint_holds_only_the_trained_tensors(tmp_path, tokenizer):
    from safetensors.torch import load_file

    model = tiny_model("llama")
    train(config(tmp_path, steps=2, save_every=2), model, tokenizer, progress=False)
    found = find_checkpoint(tmp_path / "run")
    tensors = load_file(str(found / TENSORS))
    layer_of = parameter_layers(model)
    assert set(tensors) == {n for n, layer in layer_of.items() if layer == 3}
    meta = read_meta(tmp_path / "run")
    assert meta["step"] == 2 and meta["layers"] == [3] and meta["layers_spec"] == "3"
    assert meta["config"]["lr"] == 3e-2 and meta["trainable_parameters"] == sum(t.numel() for t in tensors.values())
    params = dict(model.named_parameters())
    assert all(torch.equal(t, params[n]) for n, t in tensors.items())


def test_a_killed_run_resumes_to_the_same_result(tmp_path, tokenizer, monkeypatch):
    whole = train(config(tmp_path / "a", steps=6, save_every=2), m_whole := tiny_model("llama"), tokenizer,
                  progress=False)

    import onelayer.training.step as train_module
    real_update = train_module.policy_update

    def dies_at_step_3(*args, **kwargs):
        if args[6] == 3:  # the step index argument
            raise KeyboardInterrupt
        return real_update(*args, **kwargs)

    monkeypatch.setattr(train_module, "policy_update", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path / "b", steps=6, save_every=2), tiny_model("llama"), tokenizer, progress=False)
    assert read_meta(tmp_path / "b" / "run")["step"] == 2 and len(rewards(tmp_path / "b" / "run")) == 3
    monkeypatch.setattr(train_module, "policy_update", real_update)
    resumed_model = tiny_model("llama")
    train(config(tmp_path / "b", steps=6, save_every=2), resumed_model, tokenizer, progress=False)
    assert rewards(tmp_path / "b" / "run") == rewards(whole.out)
    for (name, p), (_, q) in zip(m_whole.named_parameters(), resumed_model.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_out_of_memory_names_the_phases_knob_and_the_run_resumes_with_a_smaller_one(tmp_path, tokenizer, monkeypatch,
                                                                                    capsys, saved_tiny):
    import onelayer.training.step as train_module
    from onelayer.cli import main

    whole = train(config(tmp_path / "a", steps=4, save_every=2), tiny_model("llama"), tokenizer, progress=False)
    real_update = train_module.policy_update

    def too_big_at_step_3(*args, **kwargs):
        if args[6] == 2 and args[4].micro_batch_size > 8:  # step index 2: the third step
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_update(*args, **kwargs)

    monkeypatch.setattr(train_module, "policy_update", too_big_at_step_3)
    with pytest.raises(OneLayerError, match=r"^out of GPU memory updating step 3: rerun with a smaller "
                       r"--micro-batch-size \(now 16, e\.g\. 8\) and the same --out: it resumes from its checkpoint at "
                       r"step 2 \(onelayer plan"):
        train(config(tmp_path / "b", steps=4, save_every=2), tiny_model("llama"), tokenizer, progress=False)
    # the advice works: the same run with half the micro-batch (and generation batch) resumes, to the same rewards
    # (the gradient is the whole batch's either way; float order aside)
    train(config(tmp_path / "b", steps=4, save_every=2, micro_batch_size=8,
                 sampling=SamplingConfig(max_new_tokens=12, generation_batch_size=128)),
          tiny_model("llama"), tokenizer, progress=False)
    assert read_meta(tmp_path / "b" / "run")["step"] == 4
    assert rewards(tmp_path / "b" / "run") == pytest.approx(rewards(whole.out), abs=1e-6)

    def no_room_to_generate(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    # from the CLI, a fresh run out of memory while generating: one line naming the other knob, nothing saved yet
    capsys.readouterr()
    monkeypatch.setattr(importlib.import_module("onelayer.training.train"), "step_rollouts", no_room_to_generate)
    code = main(["train", "--model", str(saved_tiny), "--task", "toy:repeat", "--layers", "3", "--steps", "2",
                 "--device", "cpu", "--out", str(tmp_path / "c"), "--no-progress", "--generation-batch-size", "64"])
    err = capsys.readouterr().err
    assert code == 2 and err.splitlines()[-1].startswith("error: out of GPU memory generating step 1's rollouts: rerun with a smaller "
                                        "--generation-batch-size (now 64, e.g. 32) and the same --out: nothing was "
                                        "checkpointed yet")


def test_a_run_restored_compressed_without_its_checkpoint_starts_over_with_no_stale_log(tmp_path, tokenizer):
    # committed results keep logs gzipped and drop checkpoints: the rerun must not mix the old steps in
    import gzip
    import shutil

    train(config(tmp_path, steps=2, save_every=2, eval_every=1), tiny_model("llama"), tokenizer, progress=False)
    run = tmp_path / "run"
    shutil.rmtree(find_checkpoint(run))
    for name in ("log.jsonl", "eval.jsonl"):
        old = [json.loads(x) for x in (run / name).read_text().splitlines()]
        with gzip.open(run / f"{name}.gz", "wt") as f:
            f.writelines(json.dumps({**row, "stale": True}) + "\n" for row in old)
        (run / name).unlink()
    train(config(tmp_path, steps=2, save_every=2, eval_every=1), tiny_model("llama"), tokenizer, progress=False)
    assert not list(run.glob("*.gz"))
    for name in ("log.jsonl", "eval.jsonl"):
        rows = [json.loads(x) for x in (run / name).read_text().splitlines()]
        assert rows and not any("stale" in row for row in rows)
    assert [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines()] == [1, 2]


def test_extending_a_finished_run_continues_it(tmp_path, tokenizer):
    train(config(tmp_path, steps=2, save_every=2), tiny_model("llama"), tokenizer, progress=False)
    train(config(tmp_path, steps=4, save_every=2), tiny_model("llama"), tokenizer, progress=False)
    assert [json.loads(x)["step"] for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert read_meta(tmp_path / "run")["step"] == 4


def test_a_different_experiment_in_the_same_directory_is_refused(tmp_path, tokenizer):
    train(config(tmp_path, steps=1, save_every=1), tiny_model("llama"), tokenizer, progress=False)
    with pytest.raises(OneLayerError, match=r"holds a run with another --lr \(0.03, now 0.01\)"):
        train(config(tmp_path, steps=1, lr=1e-2), tiny_model("llama"), tokenizer, progress=False)


def test_resuming_may_switch_the_rollout_engine_but_not_the_sampling(tmp_path, tokenizer):
    train(config(tmp_path, steps=1, save_every=1, sampling=SamplingConfig(max_new_tokens=12, engine="plain")),
          tiny_model("llama"), tokenizer, progress=False)
    train(config(tmp_path, steps=2, save_every=1, sampling=SamplingConfig(max_new_tokens=12, engine="fast")),
          tiny_model("llama"), tokenizer, progress=False)
    assert read_meta(tmp_path / "run")["step"] == 2
    with pytest.raises(OneLayerError, match=r"another --top-p \(1.0, now 0.9\)"):
        train(config(tmp_path, steps=3, sampling=SamplingConfig(max_new_tokens=12, top_p=0.9)),
              tiny_model("llama"), tokenizer, progress=False)
    with pytest.raises(OneLayerError, match="unknown --engine 'vllm': use auto, fast, plain"):
        train(config(tmp_path, sampling=SamplingConfig(engine="vllm")), tiny_model("llama"), tokenizer, progress=False)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path, tokenizer, monkeypatch):
    calls = {"n": 0}
    real_score = RepeatTask.score

    def score(self, completion, example):
        calls["n"] += 1
        s = real_score(self, completion, example)
        return s if calls["n"] <= 64 else type(s)(float("nan"), False, None)  # NaN from step 3 on

    monkeypatch.setattr(RepeatTask, "score", score)
    with pytest.raises(OneLayerError, match="loss is nan at step 3: lower --lr"):
        train(config(tmp_path, steps=4, save_every=1), tiny_model("llama"), tokenizer, progress=False)
    assert read_meta(tmp_path / "run")["step"] == 2


def test_ppo_epochs_minibatches_and_the_kl_term_all_act(tmp_path, tokenizer):
    def run(name, beta):
        cfg = config(tmp_path / name, algo="dr_grpo", steps=3, ppo_epochs=2, mini_batches=2, beta=beta, lr=5e-2,
                     layers="2-3", save_every=3)
        model = tiny_model("qwen3")
        train(cfg, model, tokenizer, progress=False)
        return [json.loads(x) for x in (tmp_path / name / "run" / "log.jsonl").read_text().splitlines()], model

    with_kl, kl_model = run("kl", 0.1)
    without, plain_model = run("plain", 0.0)
    assert all(row["kl"] > 0 for row in with_kl)  # after the first optimizer step the policy left the reference
    assert all(row["kl"] == 0 for row in without)
    assert any(row["clip_fraction"] > 0 for row in with_kl)  # later epochs saw ratios outside the clip range
    # the penalty changed the update: same first rollouts, different weights
    assert with_kl[0]["reward"] == without[0]["reward"]
    assert not all(torch.equal(p, q) for p, q in zip(kl_model.parameters(), plain_model.parameters(), strict=True))


def _log_rows(run_dir):
    return [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algo, aggregation", [("grpo", ""), ("dr_grpo", ""), ("grpo", "token-mean")])
def test_micro_batches_of_32_and_5_log_and_train_exactly_what_the_whole_batch_does(tmp_path, tokenizer, algo,
                                                                                   aggregation, monkeypatch):
    """32 rollouts a step: micro-batches of 32 (one) and of 5 (5, 5, 5, 5, 5, 5, 2; with two mini-batches of
    16, 5, 5, 5, 1) must accumulate the same gradient, so the same weights and the same logged numbers."""
    real_step, grads = torch.optim.AdamW.step, []

    def step(self, *args, **kwargs):  # what each optimizer step was given
        grads.append([p.grad.clone() for g in self.param_groups for p in g["params"]])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    runs = {}
    for micro in (32, 5):
        grads.clear()
        model = tiny_model("qwen3")
        cfg = config(tmp_path / str(micro), algo=algo, loss_aggregation=aggregation, steps=2, ppo_epochs=2,
                     mini_batches=2, beta=0.05, micro_batch_size=micro, save_every=2, layers="1-2")
        train(cfg, model, tokenizer, progress=False)
        runs[micro] = (_log_rows(tmp_path / str(micro) / "run"), model, list(grads))
    (whole, whole_model, whole_grads), (split, split_model, split_grads) = runs[32], runs[5]
    for a, b in zip(whole, split, strict=True):
        assert a["reward"] == b["reward"] and a["completion_tokens"] == b["completion_tokens"]
        for key in ("loss", "kl", "clip_fraction", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    assert any(row["kl"] > 0 and row["clip_fraction"] > 0 for row in whole)  # the statistics were not all 0
    assert len(whole_grads) == len(split_grads) == 8  # 2 steps x 2 epochs x 2 mini-batches
    # the first optimizer step starts from the same weights: its accumulated gradient is the whole batch's
    for g, h in zip(whole_grads[0], split_grads[0], strict=True):
        torch.testing.assert_close(h, g, rtol=1e-4, atol=1e-5 * float(g.abs().max()))
    # Adam divides by each element's running gradient scale, so rounding in elements whose gradient is ~0 can
    # move a weight by ~1e-3 of a step (lr 3e-2); a wrong normaliser would move whole tensors by ~lr
    for p, q in zip(whole_model.parameters(), split_model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-4)


def _hand_batch(tokenizer):
    """Four completions of lengths 2, 5, 7 and 3 after a 3-token prompt (completion width 7)."""
    from onelayer.rollout import RolloutBatch

    torch.manual_seed(1)
    lengths = [2, 5, 7, 3]
    ids = torch.randint(3, 80, (4, 10))
    mask = torch.tensor([[1] * n + [0] * (7 - n) for n in lengths])
    attention = torch.cat([torch.ones(4, 3, dtype=torch.long), mask], dim=1)
    return RolloutBatch(ids * attention, attention, mask, 3, [""] * 4, torch.zeros(4, dtype=torch.bool)), lengths


@pytest.mark.parametrize("algo", ["dr_grpo", "grpo"])
def test_the_update_is_the_gradient_of_the_loss_written_by_hand(tokenizer, algo):
    """With max_new_tokens 12 and completions of width 7, Dr. GRPO divides the batch's token sum by 4 x 12 (the
    length cap, not the longest completion); GRPO averages each completion's tokens, then the completions. SGD
    with lr 1 and no clipping turns the update into minus the gradient."""
    from onelayer.algorithms import get_algorithm
    from onelayer.layers import apply_selection, select_layers
    from onelayer.rollout import completion_logprobs
    from onelayer.training.step import policy_update

    batch, lengths = _hand_batch(tokenizer)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    model, reference = tiny_model("llama"), tiny_model("llama")
    groups = apply_selection(model, select_layers(model, "2"), 0.0, {})
    before = {n: p.detach().clone() for g in groups for n, p in zip(g["names"], g["params"], strict=True)}
    cfg = TrainConfig(algo=algo, lr=1.0, max_grad_norm=0.0, micro_batch_size=3,
                      sampling=SamplingConfig(max_new_tokens=12))
    stats = policy_update(model, torch.optim.SGD(groups, lr=1.0), batch, advantages, cfg,
                          get_algorithm(algo).default_aggregation, step=0)

    logp = completion_logprobs(reference, batch.input_ids, batch.attention_mask, 3, batch.completion_mask)
    weighted = advantages[:, None] * logp * batch.completion_mask
    if algo == "dr_grpo":
        loss = -weighted.sum() / (4 * 12)
        value = -(1 * 2 - 1 * 5 + 0.5 * 7 - 0.5 * 3) / 48  # rho = 1: the loss is minus the advantage-weighted tokens
    else:
        loss = -(weighted.sum(dim=1) / torch.tensor(lengths)).sum() / 4
        value = -(1 - 1 + 0.5 - 0.5) / 4
    loss.backward()
    assert stats["loss"] == pytest.approx(value, abs=1e-7)
    grads = {n: p.grad for n, p in reference.named_parameters() if n in before}
    after = dict(model.named_parameters())
    for name, grad in grads.items():
        torch.testing.assert_close(before[name] - after[name].detach(), grad, rtol=1e-4, atol=1e-7)


def _hand_update(tokenizer, cfg, advantages):
    """Layer 2 of a tiny llama updated by :func:`policy_update` with SGD at lr 1 on the hand batch: the model, the
    weights before and the batch."""
    from onelayer.algorithms import get_algorithm
    from onelayer.layers import apply_selection, select_layers
    from onelayer.training.step import policy_update

    batch, _ = _hand_batch(tokenizer)
    model = tiny_model("llama")
    groups = apply_selection(model, select_layers(model, "2"), 0.0, {})
    before = {n: p.detach().clone() for g in groups for n, p in zip(g["names"], g["params"], strict=True)}
    policy_update(model, torch.optim.SGD(groups, lr=1.0), batch, advantages, cfg,
                  cfg.loss_aggregation or get_algorithm(cfg.algo).default_aggregation, step=0)
    return model, before, batch


def test_each_mini_batch_is_normalised_by_its_own_tokens(tokenizer):
    """Two mini-batches, token-mean: each optimizer step divides by its own mini-batch's completion tokens (not the
    whole step's), and the second is taken at the weights the first left, against the step's old log-probs."""
    from onelayer.rollout import completion_logprobs

    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    cfg = TrainConfig(algo="grpo", loss_aggregation="token-mean", lr=1.0, max_grad_norm=0.0, mini_batches=2,
                      micro_batch_size=1, clip_low=0.99, clip_high=1e3, sampling=SamplingConfig(max_new_tokens=12))
    model, before, batch = _hand_update(tokenizer, cfg, advantages)
    order = torch.randperm(4, generator=torch.Generator().manual_seed(0))  # policy_update's, for seed 0, step 0
    reference = tiny_model("llama")
    trained = {n: p for n, p in reference.named_parameters() if n in before}
    old = completion_logprobs(reference, batch.input_ids, batch.attention_mask, 3, batch.completion_mask).detach()
    for rows in (order[:2], order[2:]):
        part = batch.rows(rows)
        logp = completion_logprobs(reference, part.input_ids, part.attention_mask, 3, part.completion_mask)
        width = logp.shape[1]
        ratio = torch.exp(logp - old[rows, :width])
        mask = part.completion_mask[:, :width]
        loss = -(ratio * advantages[rows, None] * mask).sum() / mask.sum()  # this mini-batch's tokens
        grads = torch.autograd.grad(loss, list(trained.values()))
        with torch.no_grad():
            for p, g in zip(trained.values(), grads, strict=True):
                p -= g
    after = dict(model.named_parameters())
    for name, p in trained.items():
        torch.testing.assert_close(after[name].detach(), p.detach(), rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(after[n], before[n]) for n in before)


def test_gradient_clipping_scales_the_update_to_the_norm(tokenizer):
    """max_grad_norm 1e-3 with SGD at lr 1: the update is the gradient, scaled to a global norm of exactly 1e-3."""
    base = dict(algo="dr_grpo", lr=1.0, micro_batch_size=3, sampling=SamplingConfig(max_new_tokens=12))
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    free, before, _ = _hand_update(tokenizer, TrainConfig(**base, max_grad_norm=0.0), advantages)
    clipped, _, _ = _hand_update(tokenizer, TrainConfig(**base, max_grad_norm=1e-3), advantages)
    gradient = {n: before[n] - p.detach() for n, p in free.named_parameters() if n in before}
    update = {n: before[n] - p.detach() for n, p in clipped.named_parameters() if n in before}
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in gradient.values()))
    assert norm > 1e-2  # clipping binds
    assert torch.sqrt(sum((u.double() ** 2).sum() for u in update.values())) == pytest.approx(1e-3, rel=1e-4)
    for name, g in gradient.items():
        torch.testing.assert_close(update[name], g * (1e-3 / norm).float(), rtol=1e-3, atol=1e-7)  # weights round at ~3e-8


def test_the_optimizer_follows_warm_up_then_the_cosine_schedule_between_its_endpoints(tmp_path, tokenizer,
                                                                                     monkeypatch):
    seen = []
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    train(config(tmp_path, steps=6, warmup_steps=2, lr_schedule="cosine", lr=0.1, save_every=6), tiny_model("llama"),
          tokenizer, progress=False)
    # warm-up (s + 1) / 3 for steps 0, 1; then 0.5 (1 + cos(pi (s - 2) / 4)) for steps 2..5
    expected = [0.1 / 3, 0.2 / 3, 0.1, 0.05 * (1 + math.cos(math.pi / 4)), 0.05, 0.05 * (1 + math.cos(3 * math.pi / 4))]
    assert seen == pytest.approx(expected, rel=1e-12)
    assert [row["lr"] for row in _log_rows(tmp_path / "run")] == pytest.approx(expected, rel=1e-12)


def test_periodic_eval_is_logged(tmp_path, tokenizer):
    train(config(tmp_path, steps=2, eval_every=1, eval_n=5, save_every=2), tiny_model("llama"), tokenizer,
          progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and all(r["n"] == 5 for r in rows)
    assert (tmp_path / "run" / "evals" / "step000002.examples.jsonl").is_file()


def test_bad_configs(tmp_path, tokenizer):
    with pytest.raises(OneLayerError, match="selects nothing"):
        train(config(tmp_path, layers="none"), tiny_model("llama"), tokenizer, progress=False)
    with pytest.raises(OneLayerError, match="--group-size must be >= 1"):
        train(config(tmp_path, group_size=0), tiny_model("llama"), tokenizer, progress=False)
    with pytest.raises(OneLayerError, match="must divide"):
        train(config(tmp_path, mini_batches=3), tiny_model("llama"), tokenizer, progress=False)
    with pytest.raises(OneLayerError, match="layer 9 is out of range"):
        train(config(tmp_path, layers="9"), tiny_model("llama"), tokenizer, progress=False)
    for name, value in (("save_every", -1), ("eval_every", -5), ("beta", math.nan), ("max_grad_norm", -1.0)):
        with pytest.raises(OneLayerError, match=f"--{name.replace('_', '-')} must be >= 0, got {value}"):
            train(config(tmp_path, **{name: value}), tiny_model("llama"), tokenizer, progress=False)
    with pytest.raises(OneLayerError, match="--eval-n must be >= 1"):
        train(config(tmp_path, eval_n=0), tiny_model("llama"), tokenizer, progress=False)
    assert not (tmp_path / "run").exists()  # each refused before the run directory was made


def test_save_every_0_checkpoints_only_at_the_end(tmp_path, tokenizer, monkeypatch):
    from onelayer.training import step as step_module

    saved, original = [], step_module.save_checkpoint
    monkeypatch.setattr(step_module, "save_checkpoint", lambda path, model, trained, meta, optimizer=None: (
        saved.append(meta["step"]), original(path, model, trained, meta, optimizer)))
    train(config(tmp_path, steps=3, save_every=0), tiny_model("llama"), tokenizer, progress=False)
    assert saved == [3] and read_meta(tmp_path / "run" / "checkpoint")["step"] == 3
    saved.clear()
    train(config(tmp_path, steps=5, save_every=2, out=str(tmp_path / "every2")), tiny_model("llama"), tokenizer,
          progress=False)
    assert saved == [2, 4, 5]


def test_prompt_sampler_is_a_function_of_seed_and_step():
    from onelayer.tasks import Example

    examples = [Example(str(i), str(i), str(i)) for i in range(10)]
    a, b = PromptSampler(examples, 1), PromptSampler(examples, 1)
    assert [e.id for e in a.batch(3, 4)] == [e.id for e in b.batch(3, 4)]
    epoch = [e.id for step in range(5) for e in a.batch(step, 2)]
    assert sorted(epoch) == sorted(e.id for e in examples)  # each example once per epoch


def test_lr_schedule():
    cfg = TrainConfig(steps=10, warmup_steps=3, lr_schedule="cosine")
    assert [round(lr_factor(cfg, s), 3) for s in (0, 1, 2)] == [0.25, 0.5, 0.75]
    assert lr_factor(cfg, 3) == 1.0 and lr_factor(cfg, 10) == pytest.approx(0.0)
    # between the endpoints: progress (s - 3) / 7 along half a cosine
    assert lr_factor(cfg, 5) == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 7)), rel=1e-12)
    assert lr_factor(cfg, 8) == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 7)), rel=1e-12)
    assert lr_factor(TrainConfig(steps=10, warmup_steps=3), 8) == 1.0  # constant after warm-up


def test_bf16_model_trains_fp32_copies_of_the_selected_layer_only(tmp_path, tokenizer):
    model = tiny_model("qwen3").to(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(config(tmp_path, steps=2, save_every=2, lr=1e-3), model, tokenizer, progress=False)
    layer_of = parameter_layers(model)
    for name, p in model.named_parameters():
        if layer_of[name] == 3:
            # updates of 1e-3 on bf16 weights would mostly round away; fp32 copies keep them
            assert p.dtype == torch.float32 and not torch.equal(p, before[name].float()), name
        else:
            assert p.dtype == torch.bfloat16 and torch.equal(p, before[name]), name
    assert all(math.isfinite(json.loads(x)["loss"]) for x in (tmp_path / "run" / "log.jsonl").open())


def test_fp16_training_is_refused(tmp_path, tokenizer):
    with pytest.raises(OneLayerError, match="use --dtype bf16 or fp32"):
        train(config(tmp_path), tiny_model("llama").half(), tokenizer, progress=False)


class _NanGrad(torch.autograd.Function):
    """Identity forward, NaN gradient backward: a stand-in for a numerical failure in the backward pass."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


def _nan_grads_in_steps(monkeypatch, bad_steps):
    import onelayer.training.step as train_module

    real_update, real_logprobs = train_module.policy_update, train_module.completion_logprobs
    current = {"step": None}

    def update(*args, **kwargs):
        current["step"] = args[6] + 1
        return real_update(*args, **kwargs)

    def logprobs(*args, **kwargs):
        out = real_logprobs(*args, **kwargs)
        return _NanGrad.apply(out) if current["step"] in bad_steps and torch.is_grad_enabled() else out

    monkeypatch.setattr(train_module, "policy_update", update)
    monkeypatch.setattr(train_module, "completion_logprobs", logprobs)


def test_a_non_finite_gradient_skips_that_update_and_says_where(tmp_path, tokenizer, monkeypatch):
    _nan_grads_in_steps(monkeypatch, {2})
    model = tiny_model("llama")
    train(config(tmp_path, steps=3, save_every=1), model, tokenizer, progress=False)
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [row.get("skipped_updates", 0) for row in log] == [0, 1, 0]
    assert log[1]["nonfinite_grad_layers"] == [3]
    assert log[1]["nonfinite_grad_tensors"] and all(".layers.3." in n for n in log[1]["nonfinite_grad_tensors"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_skipped_update_leaves_the_logged_statistics_those_of_the_applied_ones(tokenizer, monkeypatch):
    """Two PPO epochs; the first update's gradient is NaN and skipped. The step logs the second update's loss (at the
    unchanged weights, ratio 1: Dr. GRPO's minus the advantage-weighted tokens over 4 x 12), not half of it."""
    import onelayer.training.step as step_module
    from onelayer.algorithms import get_algorithm
    from onelayer.layers import apply_selection, select_layers

    real, calls = step_module.completion_logprobs, {"grad": 0}

    def logprobs(*args, **kwargs):
        out = real(*args, **kwargs)
        if torch.is_grad_enabled():
            calls["grad"] += 1
            return _NanGrad.apply(out) if calls["grad"] == 1 else out
        return out

    monkeypatch.setattr(step_module, "completion_logprobs", logprobs)
    batch, _ = _hand_batch(tokenizer)
    model = tiny_model("llama")
    groups = apply_selection(model, select_layers(model, "2"), 0.0, {})
    cfg = TrainConfig(algo="dr_grpo", lr=1e-3, ppo_epochs=2, micro_batch_size=4, sampling=SamplingConfig(max_new_tokens=12))
    stats = step_module.policy_update(model, torch.optim.SGD(groups, lr=1e-3), batch, torch.tensor([1.0, -1.0, 0.5, -0.5]),
                                      cfg, get_algorithm("dr_grpo").default_aggregation, step=0)
    assert calls["grad"] == 2 and stats["skipped_updates"] == 1
    assert stats["loss"] == pytest.approx(-(1 * 2 - 1 * 5 + 0.5 * 7 - 0.5 * 3) / 48, abs=1e-7)


def test_non_finite_gradients_three_steps_running_stop_the_run(tmp_path, tokenizer, monkeypatch):
    _nan_grads_in_steps(monkeypatch, {2, 3, 4, 5})
    with pytest.raises(OneLayerError, match=r"not finite in 3 steps in a row \(last: step 4, tensors model.layers.3"):
        train(config(tmp_path, steps=6, save_every=1), tiny_model("llama"), tokenizer, progress=False)
    assert read_meta(tmp_path / "run")["step"] == 3


def test_a_stuck_step_prints_where_every_thread_is_and_a_finished_loop_stays_quiet():
    import subprocess
    import sys

    script = ("import time\nfrom onelayer.training.step import stall_reports\n"
              "def stuck_in_a_checker():\n    time.sleep(2.5)\n"
              "with stall_reports(1.0) as rearm:\n    rearm()\n    stuck_in_a_checker()\n"
              "print('after', flush=True)\ntime.sleep(1.5)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "after\n"
    assert done.stderr.count("Timeout (0:00:01)!") == 2  # at 1 s and 2 s into the step, not after it
    assert "in stuck_in_a_checker" in done.stderr


def test_every_step_of_a_run_and_of_variants_trained_together_rearms_the_stall_report(tmp_path, tokenizer,
                                                                                      monkeypatch):
    import faulthandler

    from onelayer.training.concurrent import train_variants

    armed = []
    monkeypatch.setattr(faulthandler, "dump_traceback_later", lambda seconds, **kw: armed.append(seconds))
    train(config(tmp_path, steps=3, out=str(tmp_path / "solo")), tiny_model("llama"), tokenizer, progress=False)
    assert len(armed) == 3
    configs = [config(tmp_path, steps=2, layers=layers, out=str(tmp_path / f"v{layers}"),
                      sampling=SamplingConfig(max_new_tokens=12, engine="fast")) for layers in ("1", "2")]
    train_variants(configs, tiny_model("llama"), tokenizer, progress=False)
    assert len(armed) == 3 + 2  # one per joint step
