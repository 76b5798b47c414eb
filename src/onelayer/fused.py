"""Liger Kernel's fused RMSNorm, SwiGLU and rotary embeddings for updates (``--liger-kernels``).

A small model's update is bound by elementwise work, not by matmuls (SmolLM2 on an H100: a quarter of the
kernel time in matmuls): each norm upcasts to float32 and back, the rotary embedding and the gated activation
each read and write the whole batch, forward and backward. Liger Kernel (Triton; what TRL uses) does each in
one kernel forward and one backward. Unlike ``--compile-layers`` it costs no compilation.

Only within the block (an update): generation keeps its own path and checkpoints see the plain modules.
Llama-style decoders only, where the kernels compute what the modules do: RMSNorm that normalises in float32
and casts back before the weight, a SiLU-gated MLP, rotary embeddings that rotate halves.
"""

from __future__ import annotations

import importlib.util
import sys
from contextlib import contextmanager

import torch
from torch import nn

from .errors import OneLayerError
from .models import decoder_layers

# model types whose norms, MLPs and rotary embeddings are the Llama ones the kernels reproduce
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
INSTALL = "pip install 'liger-kernel>=0.8.5,<0.9' (or pass --liger-kernels off)"
_announced = False


def liger_ops():
    """Liger Kernel's autograd functions (RMSNorm, SiLU-and-multiply, rotary), or a one-line error."""
    try:
        from liger_kernel.ops import LigerRMSNormFunction, LigerRopeFunction, LigerSiLUMulFunction
    except ImportError as err:
        raise OneLayerError(f"--liger-kernels needs Liger Kernel, which is not installed ({err}): {INSTALL}") from None
    return LigerRMSNormFunction, LigerSiLUMulFunction, LigerRopeFunction


def unsupported_reason(model: nn.Module) -> str | None:
    """Why Liger's kernels cannot stand in for ``model``'s modules (None when they can)."""
    text = model.config.get_text_config()
    kind = getattr(text, "model_type", "?")
    if kind not in FAMILIES:
        return f"{kind} models are not supported (only {', '.join(FAMILIES)})"
    if getattr(text, "hidden_act", "silu") not in ("silu", "swish"):
        return f"its MLP activation is {text.hidden_act}, not SiLU"
    return None


def liger_installed() -> bool:
    if "liger_kernel" in sys.modules:  # imported (or, in tests, stood in for or hidden)
        return sys.modules["liger_kernel"] is not None
    return importlib.util.find_spec("liger_kernel") is not None


def liger_wanted(model: nn.Module, mode: str, device: torch.device, processes: int = 1,
                 compile_layers: bool = False) -> bool:
    """Whether an update runs through Liger's kernels under ``--liger-kernels mode``: ``on`` always (then
    :func:`liger_layers` says why it cannot), ``auto`` where they are measured to pay and can run: on a CUDA
    device, one process, a supported model, the package installed, and no ``--compile-layers`` (which fuses
    the same work)."""
    if mode != "auto":
        return mode == "on"
    global _announced
    wanted = (device.type == "cuda" and processes == 1 and not compile_layers and unsupported_reason(model) is None
              and liger_installed())
    if wanted and not _announced:  # once per process: what changed about the update, and how to undo it
        _announced = True
        print("update: RMSNorm, SwiGLU and rotary embeddings run as Liger Kernel's fused kernels (on an H200 the "
              "demo's update 1.06x faster at 128-row micro-batches, 1.3x at 256; --liger-kernels off for the plain "
              "modules)", file=sys.stderr)
    return wanted


def _is_rms_norm(module: nn.Module) -> bool:
    return (type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")
            and isinstance(getattr(module, "weight", None), torch.Tensor))


def _is_gated_mlp(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))


def _norm_forward(module: nn.Module, rms_norm):
    def forward(hidden_states):
        # "llama" casting: normalise in float32, cast to the input's dtype, then scale by the weight;
        # in_place=False: the incoming gradient may be shared with the residual branch
        return rms_norm.apply(hidden_states, module.weight, module.variance_epsilon, 0.0, "llama", False)
    return forward


def _mlp_forward(module: nn.Module, silu_mul):
    def forward(x):
        return module.down_proj(silu_mul.apply(module.gate_proj(x), module.up_proj(x)))
    return forward


def _rotary(rope):
    def apply_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        return rope.apply(q, k, cos, sin, position_ids, unsqueeze_dim)
    return apply_rotary_pos_emb


@contextmanager
def liger_layers(model: nn.Module, enabled: bool = True):
    """Within the block, ``model``'s RMSNorms (its decoder layers' and the final one), SiLU-gated MLPs and
    rotary embeddings run as Liger's fused kernels."""
    if not enabled:
        yield model
        return
    reason = unsupported_reason(model)
    if reason:
        raise OneLayerError(f"--liger-kernels cannot run this model: {reason}; pass --liger-kernels off")
    rms_norm, silu_mul, rope = liger_ops()
    _, layers = decoder_layers(model)
    patched: list[nn.Module] = []
    modules: dict[str, object] = {}  # modeling modules whose rotary function is swapped, by name
    for module in model.modules():
        if _is_rms_norm(module):
            module.forward = _norm_forward(module, rms_norm)
            patched.append(module)
        elif _is_gated_mlp(module):
            module.forward = _mlp_forward(module, silu_mul)
            patched.append(module)
    for layer in layers:
        home = sys.modules[type(layer).__module__]
        if hasattr(home, "apply_rotary_pos_emb"):  # the decoder's attention calls it by its module-level name
            modules.setdefault(home.__name__, (home, home.apply_rotary_pos_emb))
    fused_rotary = _rotary(rope)
    for home, _ in modules.values():
        home.apply_rotary_pos_emb = fused_rotary
    try:
        yield model
    finally:
        for module in patched:
            del module.forward  # back to the class's forward
        for home, original in modules.values():
            home.apply_rotary_pos_emb = original
