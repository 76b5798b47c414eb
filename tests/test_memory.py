"""The memory estimate of a run from its config alone: exact parameter, gradient and optimizer bytes (counted by
hand), activations against what autograd really keeps, and the one-line error that names the fix."""

import json
import subprocess
import sys

import pytest
import torch

from onelayer.config import SamplingConfig, TrainConfig
from onelayer.errors import OneLayerError
from onelayer.memory import GB, _activation_bytes_per_token, check_fits, estimate, fewest_gpus, model_shapes
from onelayer.rollout import completion_logprobs

# Qwen3-8B's shapes (as bench/rl_speed.py builds them): a config directory, no weights
H, MLP, HEADS, KV, D, LAYERS, VOCAB = 4096, 12288, 32, 8, 128, 36, 151936
PER_LAYER = 2 * H * HEADS * D + 2 * H * KV * D + 3 * H * MLP + 2 * H + 2 * D  # q, o, k, v, MLP, two norms, q/k norms


@pytest.fixture(scope="module")
def qwen8b(tmp_path_factory):
    from transformers import Qwen3Config

    path = tmp_path_factory.mktemp("qwen3-8b-shaped")
    Qwen3Config(vocab_size=VOCAB, hidden_size=H, intermediate_size=MLP, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=KV, head_dim=D, tie_word_embeddings=False,
                max_position_embeddings=40960).save_pretrained(path)
    return str(path)


def big(model: str, **overrides) -> TrainConfig:
    base = dict(model=model, layers="all", prompts_per_step=32, group_size=8, micro_batch_size=8, dtype="bf16",
                sampling=SamplingConfig(max_new_tokens=512, generation_batch_size=256))
    return TrainConfig(**{**base, **overrides})


def test_full_training_of_an_8b_shaped_model_counts_every_trained_and_frozen_byte(qwen8b):
    trained, frozen = LAYERS * PER_LAYER, 2 * VOCAB * H + H  # embeddings, untied head, final norm
    one = estimate(big(qwen8b), 1, prompt_tokens=100)
    assert (one.trained_parameters, one.frozen_parameters) == (trained, frozen)
    assert one.parts["weights"] == 2 * frozen  # bf16
    assert one.parts["trained"] == one.parts["gradients"] == 4 * trained and one.parts["optimizer"] == 8 * trained
    two = estimate(big(qwen8b), 2, prompt_tokens=100)
    # sharded: the frozen weights and a bf16 rollout copy of the trained ones on each GPU, the rest halved
    assert two.parts["weights"] == 2 * (frozen + trained)
    assert two.parts["trained"] == 2 * trained and two.parts["optimizer"] == 4 * trained
    # the rollout cache: 128 rows per GPU of 36 layers x keys and values x 8 heads x 128 x bf16 x 704 columns
    # (100 + 512 + one 64-column window = 676, in whole windows), plus 16 bytes per vocabulary entry; and a
    # prefill of 128 x 100 prompt tokens (one GPU: 25,600, 32,768 at most) with 4h + 3i bf16 values each
    cache = LAYERS * 2 * KV * D * 2 * 704 + VOCAB * 16
    assert two.parts["rollout_cache"] == 128 * cache + 12_800 * (4 * H + 3 * MLP) * 2
    assert one.parts["rollout_cache"] == 256 * cache + 25_600 * (4 * H + 3 * MLP) * 2
    # FSDP's buffers: the largest trained module all-gathered twice and its gradient, in bf16 and float32
    assert two.parts["buffers"] == PER_LAYER * (3 * 2 + 4) and one.parts["buffers"] == 0
    assert one.update_phase > 141 * GB > 0.9 * 141 * GB > two.update_phase  # so 2 H200s hold what one cannot
    assert fewest_gpus(big(qwen8b), 100, 141 * GB) == 2


def test_single_layer_and_lora_runs_train_what_their_specs_say(qwen8b):
    one_layer = estimate(big(qwen8b, layers="middle:1"), 1, prompt_tokens=100)
    assert one_layer.trained_parameters == PER_LAYER
    lora = estimate(big(qwen8b, layers="0,1", lora_rank=4), 1, prompt_tokens=100)
    # rank-4 adapters on the 7 linear maps of two layers: 4 x (in + out) each
    per_layer = 4 * ((H + HEADS * D) * 2 + (H + KV * D) * 2 + 3 * (H + MLP))
    assert lora.trained_parameters == 2 * per_layer
    assert lora.frozen_parameters == LAYERS * PER_LAYER + 2 * VOCAB * H + H  # every base weight stays
    # a frozen layer below the trained ones keeps no activations: middle:1 keeps half of what all keeps
    full = estimate(big(qwen8b), 1, prompt_tokens=100)
    tokens, per_token = 8 * 612, _activation_bytes_per_token(model_shapes(qwen8b), 2, 612)
    assert full.parts["activations"] - one_layer.parts["activations"] == pytest.approx(
        17 * tokens * per_token + 2 * (LAYERS - 1) * PER_LAYER, rel=1e-6)  # 17 fewer layers, fewer bf16 weight copies


def test_a_run_that_does_not_fit_says_how_many_gpus_or_which_flag_would_fit_it(qwen8b):
    with pytest.raises(OneLayerError, match=r"run it over 2 GPUs \(torchrun --nproc_per_node 2 -m onelayer train"):
        check_fits(big(qwen8b), 1, 100, 141 * GB)
    check_fits(big(qwen8b), 2, 100, 141 * GB)  # fits: no error
    # a single layer on 40 GB: the rollout cache of 256 rows does not fit; over 2 GPUs (128 rows each) or with
    # generations of 128 rows it does
    with pytest.raises(OneLayerError, match=r"run it over 2 GPUs .*, or lower --generation-batch-size 128 ") as error:
        check_fits(big(qwen8b, layers="middle:1"), 1, 100, 40 * GB)
    assert "\n" not in str(error.value)
    # with eager attention the update's activations (8 rows x 612 tokens) do not fit either, on any number of
    # GPUs (each holds a micro-batch): both batch sizes must come down
    with pytest.raises(OneLayerError, match="lower --micro-batch-size 4 and --generation-batch-size 128 ") as error:
        check_fits(big(qwen8b, layers="middle:1", attention="eager"), 1, 100, 40 * GB)
    assert "GPUs (torchrun" not in str(error.value)
    with pytest.raises(OneLayerError, match="weights alone nearly fill one"):
        check_fits(big(qwen8b, layers="middle:1"), 1, 100, 16 * GB)


@pytest.mark.parametrize("arch,attention", [("llama", "sdpa"), ("qwen3", "sdpa"), ("qwen3", "eager")])
def test_the_activation_estimate_is_what_autograd_keeps_for_the_backward(tmp_path, arch, attention):
    """The saved tensors of a bf16 update (autocast, as on a GPU) per token per layer, measured on the CPU
    with autograd's hooks: the difference between training layer 0 and the last layer is the layers between."""
    import transformers as tf

    make = {"llama": tf.LlamaConfig, "qwen3": tf.Qwen3Config}[arch]
    config = make(vocab_size=100, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32)
    config.save_pretrained(tmp_path)
    rows, length, prompt = 2, 40, 10

    def saved_bytes(layer: int) -> int:
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(config, attn_implementation=attention).to(torch.bfloat16)
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(f"model.layers.{layer}."))
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in weights:
                seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
            return t

        ids = torch.randint(3, 100, (rows, length))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            completion_logprobs(model, ids, torch.ones_like(ids), prompt, torch.ones(rows, length - prompt))
        return sum(seen.values())

    measured = (saved_bytes(0) - saved_bytes(3)) / 3 / (rows * length)
    shapes = model_shapes(str(tmp_path), attention)
    assert _activation_bytes_per_token(shapes, 2, length) == pytest.approx(measured, rel=0.1)


def test_onelayer_plan_prints_the_parts_per_gpu_and_the_fewest_gpus_that_fit(qwen8b):
    args = [sys.executable, "-m", "onelayer", "plan", "--model", qwen8b, "--layers", "all", "--gpus", "2",
            "--prompts-per-step", "32", "--group-size", "8", "--max-new-tokens", "512", "--micro-batch-size", "8",
            "--dtype", "bf16", "--gpu-memory-gb", "141", "--prompt-tokens", "100"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    trained = next(line for line in lines if line.startswith("trained (float32)")).split()
    assert [float(x) for x in trained[2:]] == [round(4 * LAYERS * PER_LAYER / GB, 1), round(2 * LAYERS * PER_LAYER / GB, 1)]
    assert next(line for line in lines if line.startswith("fits 141 GB")).split()[-2:] == ["no", "yes"]
    assert "fewest GPUs that fit: 2" in lines
    data = json.loads(subprocess.run([*args, "--json"], capture_output=True, text=True, timeout=120).stdout)
    assert data["gpus"]["2"]["parts"]["optimizer"] == 4 * LAYERS * PER_LAYER and data["gpus"]["1"]["fits"] is False


def test_a_cpu_run_that_cannot_hold_its_weights_is_refused_before_loading(qwen8b, tmp_path, monkeypatch):
    from dataclasses import replace

    from onelayer.memory import check_fits_host
    from onelayer.training import setup, train

    # middle:1 of the 8B shape on a CPU (auto is fp32 there): every weight in float32, and one layer's float32
    # copy, gradient and two Adam moments
    trained, frozen = PER_LAYER, LAYERS * PER_LAYER - PER_LAYER + 2 * VOCAB * H + H
    held = 4 * frozen + 16 * trained
    assert check_fits_host(big(qwen8b, layers="middle:1", dtype="auto"), held) == held
    with pytest.raises(OneLayerError, match=rf"need at least {held / GB:.1f} GB on a CPU .* more than the "
                                            rf"{(held - 1) / GB:.1f} GB of memory available: train on a GPU") as error:
        check_fits_host(big(qwen8b, layers="middle:1", dtype="auto"), held - 1)
    assert "\n" not in str(error.value)
    assert check_fits_host(big(qwen8b, layers="middle:1", dtype="bf16"), held) < held  # bf16 frozen weights
    # train() checks before it loads anything (the 8B directory has no weights: loading would fail otherwise)
    monkeypatch.setattr(setup, "available_host_bytes", lambda: 4 * GB)
    run = TrainConfig(model=qwen8b, task="toy:repeat", layers="middle:1", device="cpu", out=str(tmp_path / "run"))
    with pytest.raises(OneLayerError, match="on a CPU"):
        train(run, progress=False)
    from onelayer.experiments.recipes import train_and_evaluate_variants

    with pytest.raises(OneLayerError, match="on a CPU"):  # runs trained together check as one does
        train_and_evaluate_variants([run, replace(run, layers="0", out=str(tmp_path / "run0"))])
    with pytest.raises(Exception) as loading:  # --no-memory-check goes on, to the missing weights
        train(replace(run, memory_check=False), progress=False)
    assert "on a CPU" not in str(loading.value)


def test_a_family_whose_config_has_no_attention_shapes_is_held_but_not_estimated(tmp_path, tokenizer, monkeypatch,
                                                                                   capsys):
    from dataclasses import replace

    import transformers as tf

    from onelayer.memory import NoEstimate, check_fits_host
    from onelayer.training import setup
    from onelayer.training.setup import check_memory

    from .tiny import VOCAB

    path = tmp_path / "mamba"
    tf.MambaForCausalLM(tf.MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    run = TrainConfig(model=str(path), task="toy:repeat", layers="1", out=str(tmp_path / "run"))
    with pytest.raises(NoEstimate, match="no memory estimate for .*mamba: its config does not give attention shapes"):
        estimate(run, 1, 100)
    assert check_fits_host(run, 1 * GB) > 0  # what it holds needs parameter counts only
    # Gemma 4 names head_dim per layer: reading the global one raises (a RuntimeError)
    gemma4 = tmp_path / "gemma4"
    tf.Gemma4TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8).save_pretrained(gemma4)
    with pytest.raises(NoEstimate, match="no memory estimate for .*gemma4"):
        estimate(replace(run, model=str(gemma4)), 1, 100)
    # on a GPU the check says why it cannot be made, and the run goes on
    monkeypatch.setattr(setup, "total_memory", lambda device: 80 * GB)
    check_memory(replace(run, device="cuda"))
    assert "warning: no memory estimate for" in capsys.readouterr().err


def test_the_memory_a_cpu_run_can_take_is_the_smaller_of_the_machines_and_its_cgroups(tmp_path):
    from onelayer.memory import available_host_bytes, cgroup_free

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       25000000 kB\nMemAvailable:   20000000 kB\n")
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    # v1: the job's own cgroup (8 GiB, 3 GiB used) under the controller's root, which has no limit
    (v1 / "memory" / "job" / "7").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (v1 / "memory" / "memory.usage_in_bytes").write_text("1000\n")
    (v1 / "memory" / "job" / "7" / "memory.limit_in_bytes").write_text(f"{8 * GB}\n")
    (v1 / "memory" / "job" / "7" / "memory.usage_in_bytes").write_text(f"{3 * GB}\n")
    (tmp_path / "cgroup-v1").write_text("5:devices:/\n4:memory:/job/7\n0::/\n")
    assert cgroup_free(str(tmp_path / "cgroup-v1"), str(v1)) == 5 * GB
    assert available_host_bytes(str(meminfo), str(tmp_path / "cgroup-v1"), str(v1)) == 5 * GB
    # v2, seen from inside a container: its own cgroup at the root; "max" is no limit
    v2.mkdir()
    (v2 / "memory.max").write_text(f"{16 * GB}\n")
    (v2 / "memory.current").write_text(f"{1 * GB}\n")
    (tmp_path / "cgroup-v2").write_text("0::/\n")
    assert cgroup_free(str(tmp_path / "cgroup-v2"), str(v2)) == 15 * GB
    assert available_host_bytes(str(meminfo), str(tmp_path / "cgroup-v2"), str(v2)) == 15 * GB  # < 19.1 GiB free
    (v2 / "memory.max").write_text("max\n")
    assert cgroup_free(str(tmp_path / "cgroup-v2"), str(v2)) is None
    assert available_host_bytes(str(meminfo), str(tmp_path / "cgroup-v2"), str(v2)) == 20000000 * 1024
    assert available_host_bytes(str(tmp_path / "none"), str(tmp_path / "none"), str(v2)) is None
