"""--liger-kernels: which modules the fused kernels replace, that they are put back, and the errors.

Liger's Triton kernels do not run in Triton's CPU interpreter, so these tests give ``liger_kernel.ops``
reference functions (the kernels' documented math in torch ops, counting their calls): the wiring is
checked here, and the kernels' numbers against the unfused update on a GPU (bench/rl_speed.py --sections
update)."""

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from onelayer.errors import OneLayerError
from onelayer.fused import liger_layers, liger_wanted
from onelayer.rollout import completion_logprobs
from onelayer.training import train

from .test_train import config
from .tiny import tiny_model


class Calls:
    norm = mlp = rope = 0


class RMSNorm(torch.autograd.Function):
    """Liger's "llama" casting: normalise in float32, cast back to the input's dtype, times the weight."""

    @staticmethod
    def forward(ctx, x, weight, eps, offset, casting, in_place):
        assert (offset, casting, in_place) == (0.0, "llama", False)
        Calls.norm += 1
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return RMSNorm.math(x, weight, eps)

    @staticmethod
    def math(x, weight, eps):
        x32 = x.float()
        return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        with torch.enable_grad():
            x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
            dx, dw = torch.autograd.grad(RMSNorm.math(x, weight, ctx.eps), (x, weight), grad)
        return dx, dw, None, None, None, None


class SiLUMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        Calls.mlp += 1
        ctx.save_for_backward(a, b)
        return torch.nn.functional.silu(a) * b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        with torch.enable_grad():
            a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
            return torch.autograd.grad(torch.nn.functional.silu(a) * b, (a, b), grad)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids, unsqueeze_dim):
        Calls.rope += 1
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        ctx.save_for_backward(cos, sin)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        # the rotation's transpose: rotate_half^T = -rotate_half
        return (dq * cos - rotate_half(dq * sin), dk * cos - rotate_half(dk * sin), None, None, None, None)


@pytest.fixture
def liger(monkeypatch):
    ops = types.ModuleType("liger_kernel.ops")
    ops.LigerRMSNormFunction, ops.LigerSiLUMulFunction, ops.LigerRopeFunction = RMSNorm, SiLUMul, Rope
    package = types.ModuleType("liger_kernel")
    package.ops = ops
    monkeypatch.setitem(sys.modules, "liger_kernel", package)
    monkeypatch.setitem(sys.modules, "liger_kernel.ops", ops)
    Calls.norm = Calls.mlp = Calls.rope = 0
    return Calls


def logprobs_and_grads(model, fused: bool):
    torch.manual_seed(0)
    ids = torch.randint(3, 60, (2, 12))
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    with liger_layers(model, fused):
        out = completion_logprobs(model, ids, torch.ones_like(ids), 8, torch.ones(2, 4))
        out.sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen2", "mistral"])
def test_fused_modules_compute_what_the_modules_do(arch, liger):
    model = tiny_model(arch)
    layers = model.config.num_hidden_layers
    plain, plain_grads = logprobs_and_grads(model, False)
    assert (liger.norm, liger.mlp, liger.rope) == (0, 0, 0)
    fused, fused_grads = logprobs_and_grads(model, True)
    # every decoder layer's two norms (and Qwen3's q/k norms) and the final norm; every MLP; every attention
    assert liger.norm == layers * (4 if arch == "qwen3" else 2) + 1
    assert (liger.mlp, liger.rope) == (layers, layers)
    assert torch.allclose(fused, plain, atol=1e-5)
    for name, grad in plain_grads.items():
        assert torch.allclose(fused_grads[name], grad, atol=1e-5), name
    # outside the block the modules are the model's own again
    before = (liger.norm, liger.mlp, liger.rope)
    again, _ = logprobs_and_grads(model, False)
    assert (liger.norm, liger.mlp, liger.rope) == before and torch.equal(again, plain)
    assert not any("forward" in vars(m) for m in model.modules())


def test_a_run_with_liger_kernels_follows_the_unfused_trajectory(tmp_path, tokenizer, liger):
    from safetensors.torch import load_file

    from onelayer.checkpoint import find_checkpoint

    runs = {}
    for fused in (False, True):
        out = tmp_path / f"fused-{fused}"
        train(config(tmp_path, out=str(out), layers="1", steps=2, liger_kernels='on' if fused else 'off'), tiny_model("qwen3"),
              tokenizer, progress=False)
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        runs[fused] = (log, load_file(str(find_checkpoint(out) / "trained.safetensors")))
    assert liger.norm > 0 and liger.mlp > 0 and liger.rope > 0  # the update went through them
    (plain_log, plain_weights), (fused_log, fused_weights) = runs[False], runs[True]
    assert [r["reward"] for r in fused_log] == [r["reward"] for r in plain_log]
    for a, b in zip(fused_log, plain_log, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    # Adam's normalised steps (lr 3e-2) magnify the float-order differences of near-zero gradients (2.5e-5 seen
    # on one CPU); 1e-4 is still 300x below one step's movement, which a wrong gradient would show
    for name, value in fused_weights.items():
        assert torch.allclose(value, plain_weights[name], atol=1e-4), name


def test_unsupported_models_and_a_missing_package_fail_in_one_line(tmp_path, monkeypatch, liger):
    with pytest.raises(OneLayerError, match=r"gemma2 models are not supported .*pass --liger-kernels off"):
        with liger_layers(tiny_model("gemma2")):
            pass
    monkeypatch.setitem(sys.modules, "liger_kernel.ops", None)  # as if not installed
    with pytest.raises(OneLayerError, match=r"needs Liger Kernel.*pip install 'liger-kernel"):
        with liger_layers(tiny_model("llama")):
            pass
    with pytest.raises(OneLayerError, match="--liger-kernels on and --compile-layers"):
        config(tmp_path, liger_kernels="on", compile_layers=True).validate()
    with pytest.raises(OneLayerError, match="unknown --liger-kernels 'yes': use auto, on, off"):
        config(tmp_path, liger_kernels="yes").validate()
    assert Path(tmp_path).is_dir()


def test_auto_fuses_only_on_one_cuda_gpu_for_a_supported_model_with_the_package(monkeypatch, liger):
    llama, cuda, cpu = tiny_model("llama"), torch.device("cuda"), torch.device("cpu")
    assert liger_wanted(llama, "auto", cuda)
    assert not liger_wanted(llama, "auto", cpu)  # Triton kernels: CUDA only
    assert not liger_wanted(llama, "auto", cuda, processes=2)  # not over several GPUs yet
    assert not liger_wanted(llama, "auto", cuda, compile_layers=True)  # --compile-layers fuses the same work
    assert not liger_wanted(tiny_model("gemma2"), "auto", cuda)  # its norms add 1 to the weight
    assert not liger_wanted(llama, "off", cuda)
    assert liger_wanted(llama, "on", cpu)  # asked for: liger_layers says why it cannot run, if it cannot
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # as if not installed
    assert not liger_wanted(llama, "auto", cuda)


def test_variants_trained_together_with_liger_follow_the_unfused_ones(tmp_path, tokenizer, liger):
    from onelayer.training.concurrent import train_variants

    from .test_concurrent import config as variant_config
    from .test_concurrent import log

    logs = {}
    for mode in ("off", "on"):
        configs = [variant_config(tmp_path / f"{mode}{k}", layers, steps=2, liger_kernels=mode)
                   for k, layers in enumerate(("1", "2"))]
        results = train_variants(configs, tiny_model("qwen3"), tokenizer, progress=False)
        assert not any(isinstance(r, Exception) for r in results)
        logs[mode] = [log(tmp_path / f"{mode}{k}") for k in range(2)]
        if mode == "off":
            assert (liger.norm, liger.mlp, liger.rope) == (0, 0, 0)
    assert liger.norm > 0 and liger.mlp > 0 and liger.rope > 0  # each variant's update went through them
    for fused, plain in zip(logs["on"], logs["off"], strict=True):
        assert [r["reward"] for r in fused] == [r["reward"] for r in plain]
        for a, b in zip(fused, plain, strict=True):
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
