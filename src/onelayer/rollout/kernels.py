"""Triton kernels of the fast engine's decode step: attention over the static cache, and sampling.

As torch ops, a decode step's attention moves its scores through some six full passes (matmul out,
cast, scale, mask, softmax, cast back) and reads every column of the key window, left padding and
columns not yet written included; sampling makes some eight passes over ``[B, V]`` float32 logits
(temperature, log-softmax, exp, cumsum, ...). Each kernel here reads its inputs once or twice:

- :func:`decode_attention`: one program per (row, KV head) finds the span of visible columns in the
  mask, streams that head's keys and values over it in blocks (left padding and columns not yet written
  are never read), and keeps an online softmax for the query heads of its group as one tensor-core dot
  (grouped-query attention without repeating the cache);
- :func:`sample`: one program per row finds the maximum and normaliser of the tempered distribution in
  one pass, then walks the cumulative distribution up to the row's uniform in a second: the token the
  torch path draws from the same uniform (barring float rounding at a boundary between two tokens).

They run on CUDA when Triton is installed, and on CPU only through Triton's interpreter (the tests set
``TRITON_INTERPRET=1``: slow, but the same kernel code).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the fast engine keeps its torch ops
    triton = None

MIN_CAPABILITY = (8, 0)  # bf16 loads and the register file these block sizes assume
# warps per program of the attention kernel, and its cache columns per loop step for 64-wide heads (half
# as many for 128-wide): the fastest of those measured on an H100 (bench/rl_speed.py --sections attention)
WARPS, BLOCK_64 = 4, 64
# Triton's interpreter runs kernels on CPU tensors; it must be chosen before triton is imported
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device) -> bool:
    """Whether the fast engine uses the kernels on ``device`` by default (CUDA sm80+, Triton installed)."""
    return device.type == "cuda" and unavailable_reason(device) is None


def unavailable_reason(device: torch.device) -> str | None:
    """Why the kernels cannot run on ``device`` at all (None when they can, the interpreter included)."""
    if triton is None:
        return "Triton is not installed (pip install triton)"
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        return None if capability >= MIN_CAPABILITY else f"the GPU is sm{capability[0]}{capability[1]} (sm80+ needed)"
    return None if INTERPRETING else f"they run on {device.type} only through Triton's interpreter (TRITON_INTERPRET=1)"


def raised_by_triton(error: BaseException) -> bool:
    """Whether ``error`` (or what it was raised from) comes from Triton: compiling or launching a kernel."""
    while error is not None:
        if type(error).__module__.split(".")[0] == "triton":
            return True
        error = error.__cause__ or error.__context__
    return False


if triton is not None:
    @triton.jit
    def _attention_kernel(Q, K, V, MASK, OUT, scale, softcap, columns,
                          sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sm_b, sm_n, so_b, so_h,
                          GROUPS: tl.constexpr, GROUPS_P: tl.constexpr, DIM: tl.constexpr, DIM_P: tl.constexpr,
                          BLOCK: tl.constexpr, SPAN_BLOCK: tl.constexpr, SOFTCAP: tl.constexpr,
                          FP32_DOTS: tl.constexpr):
        row, head = tl.program_id(0), tl.program_id(1)
        g, d = tl.arange(0, GROUPS_P), tl.arange(0, DIM_P)
        q_heads = head * GROUPS + g
        q_mask = (g < GROUPS)[:, None] & (d < DIM)[None, :]
        # the group's query heads as the rows of a matrix (padded to the 16 rows a tensor-core dot needs)
        q = tl.load(Q + row * sq_b + q_heads[:, None] * sq_h + d[None, :], mask=q_mask, other=0.0)
        # running maximum, normaliser and weighted sum of values per query head; the maximum starts
        # finite so that rescaling by exp(old - new) is never exp(-inf + inf)
        top = tl.full([GROUPS_P], -3.0e38, tl.float32)
        total = tl.zeros([GROUPS_P], tl.float32)
        acc = tl.zeros([GROUPS_P, DIM_P], tl.float32)
        # the span of visible columns (left padding and unwritten columns lie outside it): one cheap pass
        # over the mask, so that the main loop reads only the blocks it needs and has no branch in it
        lo, hi = columns, 0
        for start in range(0, columns, SPAN_BLOCK):
            n = start + tl.arange(0, SPAN_BLOCK)  # one step for windows up to SPAN_BLOCK columns
            valid = tl.load(MASK + row * sm_b + n * sm_n, mask=n < columns, other=0) != 0
            lo = tl.minimum(lo, tl.min(tl.where(valid, n, columns), 0))
            hi = tl.maximum(hi, tl.max(tl.where(valid, n + 1, 0), 0))
        for start in range((lo // BLOCK) * BLOCK, hi, BLOCK):
            n = start + tl.arange(0, BLOCK)
            valid = tl.load(MASK + row * sm_b + n * sm_n, mask=n < hi, other=0) != 0
            kv_mask = valid[:, None] & (d < DIM)[None, :]
            # both loads issued before any arithmetic: more bytes in flight per program
            k = tl.load(K + row * sk_b + head * sk_h + n[:, None] * sk_n + d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(V + row * sv_b + head * sv_h + n[:, None] * sv_n + d[None, :], mask=kv_mask, other=0.0)
            if FP32_DOTS:  # float32 caches, and Triton's interpreter (it multiplies bf16 wrongly): not TF32
                s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = s * scale  # [GROUPS_P, BLOCK], float32
            if SOFTCAP:
                s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)  # softcap * tanh(s / softcap)
            s = tl.where(valid[None, :], s, float("-inf"))
            new_top = tl.maximum(top, tl.max(s, 1))
            p = tl.exp(s - new_top[:, None])
            rescale = tl.exp(top - new_top)
            total = total * rescale + tl.sum(p, 1)  # before rounding p, as softmax normalises
            p = p.to(V.dtype.element_ty)  # rounded as the matmul path rounds its probabilities
            if FP32_DOTS:
                acc = acc * rescale[:, None] + tl.dot(p.to(tl.float32), v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * rescale[:, None] + tl.dot(p, v)
            top = new_top
        out = acc / total[:, None]
        tl.store(OUT + row * so_b + q_heads[:, None] * so_h + d[None, :], out.to(OUT.dtype.element_ty), mask=q_mask)

    @triton.jit
    def _sample_kernel(LOGITS, UNIFORM, TOKENS, LOGPROBS, vocab, stride, inv_temperature, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        base = LOGITS + row * stride
        # pass 1: maximum and normaliser of exp(logits / T), online
        top = -3.0e38
        total = 0.0
        for start in range(0, vocab, BLOCK):
            i = start + tl.arange(0, BLOCK)
            x = tl.load(base + i, mask=i < vocab, other=float("-inf")).to(tl.float32) * inv_temperature
            new_top = tl.maximum(top, tl.max(x, 0))
            total = total * tl.exp(top - new_top) + tl.sum(tl.exp(x - new_top), 0)
            top = new_top
        # pass 2: the first token whose cumulative mass exceeds u * total (the last token of nonzero
        # mass if rounding leaves the sum short of the threshold): never one of zero probability
        threshold = tl.load(UNIFORM + row).to(tl.float32) * total
        carry = 0.0
        first = vocab
        last = 0
        for start in range(0, vocab, BLOCK):
            i = start + tl.arange(0, BLOCK)
            x = tl.load(base + i, mask=i < vocab, other=float("-inf")).to(tl.float32) * inv_temperature
            mass = tl.exp(x - top)
            cumulative = carry + tl.cumsum(mass, 0)
            hit = (cumulative > threshold) & (mass > 0)
            first = tl.minimum(first, tl.min(tl.where(hit, i, vocab), 0))
            last = tl.maximum(last, tl.max(tl.where(mass > 0, i, 0), 0))
            carry = tl.max(cumulative, 0)  # the block's last partial sum, not a separately rounded total
        token = tl.where(first < vocab, first, last)
        chosen = tl.load(base + token).to(tl.float32) * inv_temperature
        tl.store(TOKENS + row, token.to(tl.int64))
        tl.store(LOGPROBS + row, chosen - top - tl.log(total))


def _power_of_two(n: int, least: int = 1) -> int:
    return max(least, 1 << (n - 1).bit_length())


# Custom ops: torch.compile (``--compile-decode``) treats each kernel as one opaque operator instead of
# tracing into the launch.
@torch.library.custom_op("onelayer::decode_attention", mutates_args=())
def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                     scaling: float, softcap: float = 0.0, block: int = 0, warps: int = 0) -> torch.Tensor:
    """Attention of one query per row ``[B, Hq, 1, D]`` over cached ``[B, Hkv, W, D]`` keys/values
    under a boolean mask broadcastable to ``[B, 1, 1, W]`` (``softcap`` 0: none); returns
    ``[B, 1, Hq, D]`` in the values' dtype. ``block``: cache columns per step of the kernel's loop,
    ``warps``: warps per program (0: the measured defaults)."""
    if triton is None:
        raise RuntimeError(unavailable_reason(query.device))
    batch, q_heads, queries, dim = query.shape
    if queries != 1:
        raise ValueError(f"decode_attention takes one query per row, got {queries}")
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    kv_heads, columns = key.shape[1], key.shape[2]
    groups = q_heads // kv_heads
    mask = mask.expand(batch, 1, 1, columns)
    out = torch.empty(batch, 1, q_heads, dim, dtype=value.dtype, device=value.device)
    groups_p, dim_p = _power_of_two(groups, 16), _power_of_two(dim, 16)
    block = block or min(128, max(16, BLOCK_64 * 64 // dim_p))
    _attention_kernel[(batch, kv_heads)](
        query, key, value, mask, out, float(scaling), float(softcap or 1.0), columns,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), mask.stride(0), mask.stride(3), out.stride(0), out.stride(2),
        GROUPS=groups, GROUPS_P=groups_p, DIM=dim, DIM_P=dim_p, BLOCK=block,
        SPAN_BLOCK=min(1024, _power_of_two(columns, 16)), SOFTCAP=bool(softcap),
        FP32_DOTS=value.dtype == torch.float32 or query.device.type != "cuda", num_warps=warps or WARPS)
    return out


@decode_attention.register_fake
def _(query, key, value, mask, scaling, softcap=0.0, block=0, warps=0):
    batch, q_heads, _, dim = query.shape
    return query.new_empty(batch, 1, q_heads, dim, dtype=value.dtype)


@torch.library.custom_op("onelayer::sample", mutates_args=())
def sample(logits: torch.Tensor, temperature: float, uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of ``logits [B, V]`` (any float dtype, read as float32) drawn by inverting the
    tempered distribution's cumulative mass at ``uniform [B]``, and its log-prob (float32) under that
    distribution."""
    if triton is None:
        raise RuntimeError(unavailable_reason(logits.device))
    rows, vocab = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    tokens = torch.empty(rows, dtype=torch.long, device=logits.device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=logits.device)
    _sample_kernel[(rows,)](
        logits, uniform, tokens, logprobs, vocab, logits.stride(0), 1.0 / temperature, BLOCK=4096, num_warps=8)
    return tokens, logprobs


@sample.register_fake
def _(logits, temperature, uniform):
    rows = logits.shape[0]
    return logits.new_empty(rows, dtype=torch.long), logits.new_empty(rows, dtype=torch.float32)
