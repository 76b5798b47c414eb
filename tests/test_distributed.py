"""One run over two processes (FSDP2 over gloo on the CPU, ``torchrun --standalone``) against one process with
the same global batch: the same log, the same trained weights, checkpoints that resume on either; and the
parts of the machinery that need no processes."""

import copy
import json
import shutil
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from onelayer.config import SamplingConfig, ScanConfig, TrainConfig, from_dict
from onelayer.errors import OneLayerError
from onelayer.memory import estimate
from onelayer.rollout.streams import row_keys
from onelayer.training import train
from onelayer.training.distributed import (
    World,
    _clone_along,
    by_index,
    by_name,
    check_sharded,
    trained_units,
)
from onelayer.training.step import micro_batches

from .test_scan import _run
from .tiny import tiny_model

HELPER = Path(__file__).with_name("multiprocess_train.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# what a run computes (not how long it took, nor on how many processes)
NOT_SCIENCE = ("seconds_", "tokens_per_s", "world_size", "sharding", "peak_memory")

# several trained modules with a root over them (two layers and the final norm), one-process mini-batches
# split over the processes, the KL term's reference swapped into the shards; and LoRA, whose frozen base
# weights inside a trained layer stay out of FSDP
RUNS = {"layers": dict(layers="1,3,norm", mini_batches=2, beta=0.1),
        "lora": dict(layers="0,2", lora_rank=2, lr=0.1)}


def recipe(saved_tiny, out, **overrides) -> TrainConfig:
    base = dict(model=str(saved_tiny), task="toy:repeat", steps=2, prompts_per_step=4, group_size=4, lr=1e-2,
                micro_batch_size=3, save_every=2, device="cpu", out=str(out),
                sampling=SamplingConfig(max_new_tokens=6, engine="fast"))
    return TrainConfig(**{**base, **overrides})


def in_torchrun(configs: list[TrainConfig], directory: Path, seconds: float = 300) -> str:
    """Train ``configs`` with two torchrun processes; returns their stderr."""
    listing = directory / "configs.json"
    listing.write_text(json.dumps([asdict(c) for c in configs]))
    return _run([*TORCHRUN, str(HELPER), str(listing)], seconds)


def log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def science(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(NOT_SCIENCE)}


def assert_same_log(one: Path, two: Path) -> None:
    """Two run directories logged the same steps, up to float rounding."""
    a, b = log(one), log(two)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert science(x).keys() == science(y).keys()
        for key, value in science(x).items():
            assert y[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (x["step"], key)


def assert_same_run(one: Path, two: Path) -> None:
    """Two run directories computed the same steps (up to float rounding) and trained the same tensors."""
    assert_same_log(one, two)
    ta, tb = (load_file(str(d / "checkpoint" / "trained.safetensors")) for d in (one, two))
    assert ta.keys() == tb.keys()
    for name, value in ta.items():
        torch.testing.assert_close(tb[name], value, atol=2e-5, rtol=0)
    oa, ob = (torch.load(d / "checkpoint" / "optimizer.pt", weights_only=True) for d in (one, two))
    assert oa["state"].keys() == ob["state"].keys() and len(oa["state"]) == len(ta)
    for i, state in oa["state"].items():
        torch.testing.assert_close(ob["state"][i]["exp_avg_sq"], state["exp_avg_sq"], atol=1e-7, rtol=1e-3)
    assert [g["names"] for g in oa["param_groups"]] == [g["names"] for g in ob["param_groups"]]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, saved_tiny):
    """Each of RUNS trained for 2 steps by one process (in this one) and by two (torchrun)."""
    root = tmp_path_factory.mktemp("pairs")
    for name, overrides in RUNS.items():
        train(recipe(saved_tiny, root / f"{name}-1", **overrides), progress=False)
    in_torchrun([recipe(saved_tiny, root / f"{name}-2", **overrides) for name, overrides in RUNS.items()], root)
    return root


@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_train_what_one_does_with_the_same_batch(pairs, name):
    one, two = pairs / f"{name}-1", pairs / f"{name}-2"
    assert_same_run(one, two)
    assert {(r["world_size"], r["sharding"]) for r in log(one)} == {(1, "none")}
    shardings = {r["sharding"] for r in log(two)}
    assert {r["world_size"] for r in log(two)} == {2} and len(shardings) == 1
    assert shardings.pop().startswith("fsdp2: 3 trained modules" if name == "layers" else "fsdp2: 2 trained modules")


def test_the_estimate_gives_the_trained_and_optimizer_bytes_each_process_holds(pairs, saved_tiny):
    config = recipe(saved_tiny, "x", **RUNS["layers"])
    tensors = load_file(str(pairs / "layers-1" / "checkpoint" / "trained.safetensors"))
    trained = sum(t.numel() for t in tensors.values())  # two decoder layers and the final norm
    model = tiny_model("llama")
    assert trained == sum(p.numel() for n, p in model.named_parameters()
                          if n.startswith(("model.layers.1.", "model.layers.3.", "model.norm")))
    costs = json.loads((pairs / "layers-2" / "costs.json").read_text())
    for gpus, measured in ((2, costs), (1, None)):
        parts = estimate(config, gpus, prompt_tokens=10).parts
        assert parts["trained"] == 4 * trained // gpus and parts["gradients"] == parts["trained"]
        assert parts["optimizer"] == 8 * trained // gpus
        if measured:
            assert measured["trained_bytes_per_gpu"] == parts["trained"]
            # AdamW's moments, and one float32 step counter per tensor on every process
            assert measured["optimizer_state_bytes_per_gpu"] == parts["optimizer"] + 4 * len(tensors)
            assert measured["optimizer_state_bytes"] == 8 * trained + 4 * len(tensors)
            assert measured["world_size"] == 2 and measured["trainable_parameters"] == trained
    meta = json.loads((pairs / "layers-2" / "checkpoint" / "onelayer.json").read_text())
    assert meta["trainable_parameters"] == trained and sorted(meta["trained"]) == sorted(tensors)


def test_a_sharded_checkpoint_resumes_on_one_process_and_on_two_as_the_run_would_have_gone_on(pairs, tmp_path,
                                                                                              saved_tiny):
    overrides = RUNS["layers"]
    for name, source in (("straight", "layers-1"), ("on-one", "layers-2"), ("on-two", "layers-2")):
        shutil.copytree(pairs / source, tmp_path / name)
    more = {name: recipe(saved_tiny, tmp_path / name, **{**overrides, "steps": 3})
            for name in ("straight", "on-one", "on-two")}
    train(more["straight"], progress=False)  # the one-process run, extended
    train(more["on-one"], progress=False)  # the two-process checkpoint, on one process
    in_torchrun([more["on-two"]], tmp_path)  # ... and on two again
    for name in ("on-one", "on-two"):
        assert [r["step"] for r in log(tmp_path / name)] == [1, 2, 3]
        assert_same_run(tmp_path / "straight", tmp_path / name)
    assert log(tmp_path / "on-one")[-1]["world_size"] == 1 and log(tmp_path / "on-two")[-1]["world_size"] == 2


def test_a_scan_trains_its_full_run_on_a_group_of_two_processes_as_one_process_would(tmp_path, saved_tiny):
    from onelayer.experiments.scan import run_scan

    args = ["scan", "--model", str(saved_tiny), "--task", "toy:repeat", "--layers", "1,3", "--steps", "2",
            "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "6", "--eval-n", "6", "--lr", "1e-2",
            "--device", "cpu", "--engine", "fast", "--no-progress", "--keep-optimizer", "none"]
    _run([*TORCHRUN, "-m", "onelayer", *args, "--group-gpus", "2", "--out", str(tmp_path / "duo")], seconds=300)
    solo = ScanConfig(recipe=recipe(saved_tiny, tmp_path / "solo", layers="1,3", prompts_per_step=2, eval_n=6,
                                    micro_batch_size=32, save_every=10, keep_optimizer="none"))
    run_scan(solo, progress=False)
    duo = tmp_path / "duo"
    assert json.loads((duo / "scan.json").read_text())["placement"] == {"full-s0": 2}
    # the sharded run's finished checkpoint has its weights and, with --keep-optimizer none, no optimizer state
    assert (duo / "runs" / "full-s0" / "checkpoint" / "trained.safetensors").is_file()
    assert not list(duo.glob("runs/*/checkpoint/optimizer.pt"))
    a, b = (json.loads((d / "profile.json").read_text()) for d in (tmp_path / "solo", duo))
    assert a["points"] == b["points"] and a["full_gain"] == b["full_gain"]
    for name in ("full-s0", "layer001-s0", "layer003-s0"):
        one, two = tmp_path / "solo" / "runs" / name, duo / "runs" / name
        assert_same_log(one, two)
        result = json.loads((two / "result.json").read_text())
        assert result["world_size"] == (2 if name == "full-s0" else 1)
        assert result["sharding"].startswith("fsdp2: 4 trained modules") == (name == "full-s0")
    # the sharded run, given a step more on two processes, resumes without the state it dropped, and says so
    full = duo / "runs" / "full-s0"
    extended = replace(from_dict(TrainConfig, json.loads((full / "config.json").read_text())), steps=3)
    err = in_torchrun([extended], tmp_path)
    assert f"resuming {full} from step 2 of 3 without optimizer state (dropped by --keep-optimizer none)" in err
    assert [r["step"] for r in log(full)] == [1, 2, 3]


# ------------------------------------------------------------------------------------------ no processes


class TwoProcesses(World):
    """Rank ``rank`` of two, its collectives answered as if the other process had ``other``'s values."""

    def __init__(self, rank: int, other: float = 0):
        super().__init__(rank, 2)
        object.__setattr__(self, "other", other)

    def max(self, value):
        return max(value, self.other)


def test_micro_batches_are_as_many_on_every_process_padded_with_a_zero_weight_stand_in():
    rows = torch.arange(7)
    parts = micro_batches(rows, 3, TwoProcesses(0, other=4))  # the other process has 4 micro-batches
    assert [p.tolist() for p, _ in parts] == [[0, 1, 2], [3, 4, 5], [6], [0]]
    assert [real for _, real in parts] == [True, True, True, False]
    assert [real for _, real in micro_batches(rows, 3, TwoProcesses(0, other=1))] == [True, True, True]
    assert [p.tolist() for p, _ in micro_batches(rows, 4)] == [[0, 1, 2, 3], [4, 5, 6]]


def test_each_process_takes_its_contiguous_share_of_the_prompts_or_is_told_how_to_split_them():
    prompts = list("abcdef")
    assert World(1, 2).share(prompts) == ["d", "e", "f"] and World().share(prompts) == prompts
    assert World(2, 3).first(4) == 8
    with pytest.raises(OneLayerError, match="multiple of 4"):
        World(0, 4).share(prompts)


def test_a_share_of_a_batch_draws_the_rows_it_has_in_the_whole_batch():
    whole = row_keys([123, 456], 8)
    assert torch.equal(row_keys([123], 3, first_row=5), whole[5:8])
    assert torch.equal(row_keys([456], 4, first_row=4), whole[12:16])


def test_what_a_run_over_several_processes_cannot_do_fails_before_loading():
    config = TrainConfig(prompts_per_step=6, group_size=4)
    check_sharded(config, World())  # one process: anything goes
    check_sharded(config, World(0, 2))
    with pytest.raises(OneLayerError, match="multiple of 4"):
        check_sharded(config, World(0, 4))
    with pytest.raises(OneLayerError, match="--mini-batches 8 must divide each process's 12 rollouts"):
        check_sharded(replace(config, mini_batches=8), World(0, 2))
    with pytest.raises(OneLayerError, match="--compile-layers"):
        check_sharded(replace(config, compile_layers=True), World(0, 2))


def test_trained_tensors_map_to_their_modules_and_a_tied_embedding_is_refused():
    llama = tiny_model("llama")  # ties its head to the embedding
    names = [n for n, _ in llama.named_parameters() if n.startswith(("model.layers.2.", "model.layers.0.", "model.norm"))]
    assert trained_units(llama, names) == ["model.layers.0", "model.layers.2", "model.norm"]
    with pytest.raises(OneLayerError, match="tied"):
        trained_units(llama, ["model.embed_tokens.weight"])
    qwen = tiny_model("qwen3")
    assert trained_units(qwen, ["lm_head.weight", "model.embed_tokens.weight"]) == ["lm_head", "model.embed_tokens"]


def test_the_update_models_hooks_and_modules_are_its_own_and_its_weights_shared():
    model = tiny_model("llama")
    replacement = copy.deepcopy(model.model.layers[1])
    twin = _clone_along(model, {"model.layers.1": replacement})
    assert twin.model.layers[1] is replacement and model.model.layers[1] is not replacement
    assert twin.model.layers[0] is model.model.layers[0] and twin.lm_head is model.lm_head
    assert twin.model.embed_tokens.weight is model.model.embed_tokens.weight
    calls = []
    twin.model.register_forward_pre_hook(lambda *_: calls.append("twin"))
    model.model(input_ids=torch.tensor([[3, 4]]))
    assert calls == []
    twin.model(input_ids=torch.tensor([[3, 4]]))
    assert calls == ["twin"]


def test_optimizer_state_by_name_and_by_index_are_each_others_inverse():
    order = ["a.weight", "b.weight", "c.bias"]
    by_names = {"state": {"a.weight": {"step": 1}, "c.bias": {"step": 2}},
                "param_groups": [{"lr": 0.1, "params": ["a.weight", "b.weight"]}, {"lr": 0.2, "params": ["c.bias"]}]}
    indexed = by_index(by_names, order)
    assert indexed == {"state": {0: {"step": 1}, 2: {"step": 2}},
                       "param_groups": [{"lr": 0.1, "params": [0, 1]}, {"lr": 0.2, "params": [2]}]}
    assert by_name(indexed, order) == by_names


def test_runs_that_need_a_group_of_gpus_get_the_widest_groups_the_gpus_and_prompts_allow():
    from onelayer.experiments.sharding import group_ranks

    assert group_ranks(8, 2, runs=1, prompts=32) == [tuple(range(8))]  # one run: every GPU busy
    assert group_ranks(8, 2, runs=3, prompts=32) == [(0, 1), (2, 3), (4, 5)]
    assert group_ranks(8, 2, runs=9, prompts=32) == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert group_ranks(8, 2, runs=2, prompts=6) == [(0, 1, 2), (3, 4, 5)]  # 4 would not split 6 prompts
    with pytest.raises(OneLayerError, match="--nproc_per_node 4"):
        group_ranks(2, 4, runs=1, prompts=32)
    with pytest.raises(OneLayerError, match="--prompts-per-step 5 does not split over 2"):
        group_ranks(2, 2, runs=1, prompts=5)


def test_only_runs_of_more_than_one_layer_are_given_a_group(saved_tiny):
    from onelayer.experiments.scan import plan_scan, run_widths
    from onelayer.experiments.sharding import run_width, trains_many_layers

    config = TrainConfig(model=str(saved_tiny), device="cpu")
    assert [trains_many_layers(replace(config, layers=spec), 4) for spec in ("all", "2", "2,norm", "1-2")] == \
        [True, False, True, True]
    assert trains_many_layers(replace(config, layers="2", lora_rank=4), 4)
    assert run_width(config, 3, large=False) == 1 and run_width(config, 3, large=True) == 3
    assert run_width(config, 0, large=True) == 1  # on a CPU the estimate asks for nothing more
    scan = ScanConfig(recipe=replace(config, layers="1,3"), seeds=2, group_gpus=2)
    widths = run_widths(scan, plan_scan(scan, 4))
    assert widths == {"base": 1, "full-s0": 2, "full-s1": 2, "layer001-s0": 1, "layer001-s1": 1, "layer003-s0": 1,
                      "layer003-s1": 1}
