"""The fast sampling path: a decode loop over a preallocated KV cache, one CUDA-graph replay per token.

transformers' ``generate`` spends ~100 ms per decode step on an H100 in Python and kernel launches,
whatever the batch; the GPU needs a few. Here:

- prompts are prefilled, in row chunks, into a static cache (``[rows, kv_heads, L, head_dim]`` per layer);
- a decode step runs the model's own modules (so each architecture keeps its norms, rotary variant, q/k
  norms, softcaps) with a registered attention function that reads the cache once per KV head (no
  per-query-head copies) under a boolean mask built from tensors, then samples on the GPU and does the
  EOS bookkeeping: fixed shapes and no host sync, so on CUDA each step is captured once per key window
  (multiples of ``WINDOW`` columns, so early steps do not read the empty end of the cache) and replayed;
- on CUDA, attention and sampling run as Triton kernels (:mod:`.kernels`), the attention kernel skipping
  masked blocks of the cache itself (so one window, one captured step, serves every column);
- the loop asks every ``CHECK_EVERY`` steps how many rows are still going: it stops when none is, and when some
  have finished it may move the others to a smaller batch (:func:`compact_now`: their cache rows gathered to the
  front of the same cache, new captured steps), so finished rows stop costing decode work.

On CPU the same loop runs eagerly (tests check it against ``generate`` and a plain forward).
"""

from __future__ import annotations

import copy
import functools
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from .. import compat
from ..compiled import allow_recompiles
from ..errors import OneLayerError, first_line
from . import kernels as _kernels
from .batch import RolloutBatch, assemble_batch, encode_prompts, eos_token_ids, pad_columns
from .logprobs import head_logits, logit_softcap, position_ids_from_mask
from .streams import row_keys, uniforms

WINDOW = 64  # key-window granularity of the captured decode steps (and of the cache length)
CHECK_EVERY = 16  # decode steps between checks that every row has finished (each check syncs)
# With CUDA graphs, compact a batch to its unfinished rows once they are at most this share of it: a compaction
# captures new steps (a warm-up step, then torch.cuda.graph, which synchronises and empties the allocator's cache).
# Without them a compaction costs a gather of the live rows' cache (about what one step's attention reads), so
# it pays at every check that finds a finished row.
COMPACT_BELOW = 0.5
PREFILL_TOKENS = 32_768  # prompt tokens per prefill chunk: bounds activations and attention scores
ATTENTION = "onelayer_static_cache"
FUSED_ATTENTION = "onelayer_static_cache_fused"

# model_type values whose decode path the tests check against transformers (greedy tokens, log-probs);
# any other architecture falls back to the plain path with a notice.
ARCHITECTURES = frozenset({"llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3", "olmo2",
                           "gpt2", "gpt_neox"})


def compact_now(going: int, rows: int, steps_left: int, below: float) -> bool:
    """Whether a check that finds ``going`` of ``rows`` unfinished, with ``steps_left`` decode steps to go,
    compacts the batch to them: some row has finished, at most ``below`` of them go on, and at least one more
    check's worth of steps is left to save."""
    return going < rows and going <= below * rows and steps_left >= CHECK_EVERY


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the fast path cannot run ``model`` (None when it can)."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        return f"it needs transformers >= 5 (installed: {transformers.__version__})"
    model_type = model.config.get_text_config().model_type
    if model_type not in ARCHITECTURES:
        return f"architecture '{model_type}' is not one it was checked on ({', '.join(sorted(ARCHITECTURES))})"
    return None


# ---------------------------------------------------------------------------------------------- sampling


def nucleus_mask(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The smallest set of most likely tokens whose mass reaches ``top_p`` (as transformers' top-p)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    return torch.zeros_like(sorted_probs, dtype=torch.bool).scatter(-1, order, mass_before < top_p)


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float,
                  uniform: torch.Tensor | None = None, fused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from float32 ``logits [B, V]``, and its log-prob under the tempered distribution
    (before top-p truncation, as the trainer computes it). ``temperature <= 0`` is greedy (log-prob at T=1).

    Sampling inverts each row's cumulative distribution at ``uniform [B]`` (values in (0, 1); fresh
    draws of the global generator when None): no host sync, so it can live inside a CUDA graph, and
    with counter-based uniforms (:mod:`.streams`) a row's tokens do not depend on its batch.
    ``fused``: the same inversion in one Triton kernel (:func:`.kernels.sample`, which also reads bf16
    logits) where it applies (temperature > 0, no top-p truncation, uniforms given).
    """
    if fused and temperature > 0 and top_p >= 1.0 and uniform is not None:
        return _kernels.sample(logits, temperature, uniform)
    if temperature <= 0:
        tokens = logits.argmax(dim=-1)
        return tokens, logits.log_softmax(-1).gather(-1, tokens[:, None])[:, 0]
    logp = (logits / temperature).log_softmax(-1)
    probs = logp.exp()
    if top_p < 1.0:
        probs = probs.masked_fill(~nucleus_mask(probs, top_p), 0.0)
    cumulative = probs.cumsum(dim=-1)
    if uniform is None:
        uniform = torch.rand(logits.shape[0], device=logits.device)
    # the first token whose cumulative mass exceeds u * total: never one of zero probability
    total = cumulative[:, -1:]
    threshold = torch.minimum(uniform[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    tokens = torch.searchsorted(cumulative, threshold, right=True)[:, 0].clamp_max_(logits.shape[-1] - 1)
    return tokens, logp.gather(-1, tokens[:, None])[:, 0]


# --------------------------------------------------------------------------------------- cache, attention


class StaticKVCache(compat.cache_base()):
    """Keys and values of ``rows`` sequences of up to ``length`` columns, preallocated per layer on first use.

    ``update`` (called by every attention module) writes ``columns`` of rows ``rows`` in place and returns
    the first ``window`` columns; the decode loop sets those three before each forward.
    """

    def __init__(self, rows: int, length: int):
        super().__init__(layers=[])
        self.rows_total, self.length = rows, length
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.rows, self.columns, self.window = slice(None), None, length

    def compacted(self, live: torch.Tensor) -> StaticKVCache:
        """A cache of rows ``live`` (ascending) of this one, in the front rows of the same storage: this
        cache's other rows are overwritten (it is only written again by the next prefill)."""
        twin = StaticKVCache(live.numel(), self.length)
        for mine, theirs in ((self.keys, twin.keys), (self.values, twin.values)):
            for layer, tensor in mine.items():
                tensor[:live.numel()] = tensor.index_select(0, live)
                theirs[layer] = tensor[:live.numel()]
        return twin

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        # what follows layer_idx differs between transformers releases and is not needed (see compat)
        if layer_idx not in self.keys:
            heads = key_states.shape[1]
            self.keys[layer_idx] = key_states.new_zeros(self.rows_total, heads, self.length, key_states.shape[-1])
            self.values[layer_idx] = value_states.new_zeros(self.rows_total, heads, self.length,
                                                            value_states.shape[-1])
        keys, values = self.keys[layer_idx][self.rows], self.values[layer_idx][self.rows]
        keys.index_copy_(2, self.columns, key_states.to(keys.dtype))
        values.index_copy_(2, self.columns, value_states.to(values.dtype))
        return keys[:, :, :self.window], values[:, :, :self.window]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always passed explicitly

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.keys.values(), *self.values.values()))


def cached_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **_):
    """Attention of queries ``[B, Hq, S, D]`` over cached ``[B, Hkv, W, D]`` keys/values under a boolean
    mask ``[B, 1, S, W]``. Query heads are grouped onto their KV head instead of repeating the cache."""
    batch, q_heads, queries, dim = query.shape
    kv_heads = key.shape[1]
    groups = q_heads // kv_heads
    q = query.reshape(batch, kv_heads, groups * queries, dim)
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * (scaling if scaling is not None else dim ** -0.5)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(batch, kv_heads, groups, queries, -1).masked_fill(~attention_mask[:, :, None], float("-inf"))
    probs = scores.softmax(dim=-1).to(value.dtype).view(batch, kv_heads, groups * queries, -1)
    out = torch.matmul(probs, value).view(batch, q_heads, queries, -1)
    return out.transpose(1, 2), None


def fused_cached_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                           **kwargs):
    """:func:`cached_attention` with a decode step's single query per row through the Triton kernel
    (:func:`.kernels.decode_attention`); prefill keeps the matmuls."""
    if query.shape[2] != 1:
        return cached_attention(module, query, key, value, attention_mask, scaling, dropout, softcap, **kwargs)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    return _kernels.decode_attention(query, key, value, attention_mask, scaling, softcap or 0.0), None


@contextmanager
def cached_attention_for(model: nn.Module, fused: bool = False):
    """Route ``model``'s attention modules to :func:`cached_attention` (``fused``:
    :func:`fused_cached_attention`) for the duration."""
    compat.register_attention(ATTENTION, cached_attention)
    compat.register_attention(FUSED_ATTENTION, fused_cached_attention)
    with compat.attention_implementation(model, FUSED_ATTENTION if fused else ATTENTION):
        yield


def _sliding_window(config) -> int | None:
    window = getattr(config, "sliding_window", None)
    return window if window and getattr(config, "use_sliding_window", True) else None


def mask_argument(config, allowed: torch.Tensor, query_columns: torch.Tensor, key_columns: torch.Tensor):
    """What to pass as ``attention_mask``: a ``[B, 1, S, W]`` boolean mask, or a dict per layer type for
    models that mix full and sliding-window layers. ``allowed`` is ``[B, S, W]`` without the window."""
    window = _sliding_window(config)
    sliding = allowed if window is None else allowed & (query_columns[:, None] - key_columns[None, :] < window)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return {"full_attention": allowed[:, None], "sliding_attention": sliding[:, None]}
    return sliding[:, None]


# ------------------------------------------------------------------------------------------ decode state


@functools.cache
def _compiled_forward():
    """:meth:`DecodeState._forward` under torch.compile: one graph per key window (static shapes), its
    elementwise work (norms, rotary, activations, casts, masking) fused into few kernels. Inductor caches
    compiled code on disk, so a later process with the same shapes compiles in seconds. (The plain
    function, not a bound method kept on the state: that would be a reference cycle, and a released
    state's cache would stay allocated until the garbage collector ran.)"""
    allow_recompiles()  # every batch shape, window and routing of layer variants is a graph of its own
    return torch.compile(DecodeState._forward, dynamic=False)


class DecodeState:
    """Buffers of one batch shape (``rows`` x ``length`` columns) and the decode steps captured on them."""

    def __init__(self, model: nn.Module, rows: int, length: int, temperature: float, top_p: float,
                 eos_ids: list[int], pad_id: int, cuda_graphs: bool, ignore_eos: bool = False, row_hook=None,
                 compiled: bool = False, fused: bool = False):
        device = next(model.parameters()).device
        self.row_hook = row_hook or (lambda start, stop, rows=None: None)
        self.row_map: list[int] | None = None  # rows of the batch this state holds, after compaction (else all)
        self.model, self.rows, self.length = model, rows, length
        self.temperature, self.top_p, self.pad_id, self.cuda_graphs = temperature, top_p, pad_id, cuda_graphs
        self.config = model.config.get_text_config()
        self.head, self.softcap = model.get_output_embeddings(), logit_softcap(model)
        self.cache = StaticKVCache(rows, length)
        self.backbone = compat.backbone(model)
        self.cache_argument = compat.cache_argument(self.backbone, self.cache)  # found once, outside graphs
        self.eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
        self.ignore_eos = ignore_eos
        self.key_columns = torch.arange(length, device=device)
        self.key_valid = torch.ones(rows, length, dtype=torch.bool, device=device)
        self.current = torch.zeros(rows, dtype=torch.long, device=device)  # the token fed to the next step
        self.position = torch.zeros(rows, dtype=torch.long, device=device)  # its position id
        self.column = torch.zeros(1, dtype=torch.long, device=device)  # its cache column
        self.step_index = torch.zeros(1, dtype=torch.long, device=device)  # next output column
        self.finished = torch.zeros(rows, dtype=torch.bool, device=device)
        self.keys = torch.zeros(rows, dtype=torch.long, device=device)  # each row's random stream
        self.tokens = torch.full((rows, length), pad_id, dtype=torch.long, device=device)
        self.logprobs = torch.zeros(rows, length, dtype=torch.float32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = torch.cuda.graph_pool_handle() if cuda_graphs else None
        self.compiled = compiled  # decode steps through torch.compile (prefill, once per batch, stays eager)
        self.fused = fused  # sampling (and, through the attention implementation, attention) in Triton kernels
        # the sampling kernel reads the head's logits in their own dtype (a float32 copy of [rows, vocab]
        # costs more than the rest of sampling) where it samples and no softcap needs float32 first
        self.raw_logits = fused and temperature > 0 and top_p >= 1.0 and not self.softcap

    def fits(self, rows: int, length: int, temperature: float, top_p: float) -> bool:
        return (rows, temperature, top_p) == (self.rows, self.temperature, self.top_p) and length <= self.length

    def _record(self, logits: torch.Tensor) -> None:
        """Sample from ``logits``, write the token and its log-prob, and advance every row by one."""
        if self.ignore_eos:  # fixed-length generation (benchmarks): EOS is never drawn
            logits = logits.index_fill(-1, self.eos, float("-inf"))
        tokens, logprobs = sample_tokens(logits, self.temperature, self.top_p, uniforms(self.keys, self.step_index),
                                         self.fused)
        tokens = tokens.masked_fill(self.finished, self.pad_id)
        self.tokens.index_copy_(1, self.step_index, tokens[:, None])
        self.logprobs.index_copy_(1, self.step_index, logprobs.masked_fill(self.finished, 0.0)[:, None])
        self.finished |= torch.isin(tokens, self.eos)
        self.current.copy_(tokens)
        self.position += 1
        self.column += 1
        self.step_index += 1

    def _forward(self, input_ids, mask, position_ids) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                                use_cache=True, **self.cache_argument).last_hidden_state
        if self.raw_logits:
            return self.head(hidden[:, -1])
        return head_logits(self.head, hidden[:, -1], self.softcap)

    def prefill(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, keys: torch.Tensor) -> None:
        """Write the prompts' keys/values, sample every row's first token (row streams ``keys``), reset
        the bookkeeping."""
        rows, width = prompt_ids.shape
        self.keys.copy_(keys)
        self.key_valid.fill_(True)
        self.key_valid[:, :width] = prompt_mask.bool()
        self.finished.fill_(False)
        self.tokens.fill_(self.pad_id)
        self.logprobs.zero_()
        columns = self.key_columns[:width]
        causal = columns[None, :] <= columns[:, None]
        # a left-padding query would attend to nothing (an all -inf softmax row is NaN): it sees itself
        diagonal = columns[None, :] == columns[:, None]
        positions = position_ids_from_mask(prompt_mask)
        logits = []
        chunk = max(1, PREFILL_TOKENS // width)
        self.cache.columns, self.cache.window = columns, width
        for start in range(0, rows, chunk):
            part = slice(start, start + chunk)
            allowed = (causal[None] & self.key_valid[part, None, :width]) | diagonal[None]
            self.cache.rows = part
            self.row_hook(start, min(start + chunk, rows), self.row_map)
            logits.append(self._forward(prompt_ids[part], mask_argument(self.config, allowed, columns, columns),
                                        positions[part]))
        self.cache.rows = slice(None)
        self.position.copy_(prompt_mask.sum(dim=1) - 1)
        self.column.fill_(width - 1)
        self.step_index.zero_()
        self._record(torch.cat(logits))

    def _decode(self, window: int) -> None:
        """One decode step reading the first ``window`` cache columns (all tensor ops: capturable)."""
        self.cache.columns, self.cache.window = self.column, window
        keys = self.key_columns[:window]
        allowed = (self.key_valid[:, :window] & (keys <= self.column))[:, None, :]
        mask = mask_argument(self.config, allowed, self.column, keys)
        self.row_hook(0, self.rows, self.row_map)
        forward = _compiled_forward() if self.compiled else DecodeState._forward
        self._record(forward(self, self.current[:, None], mask, self.position[:, None]))

    def decode(self, column: int) -> None:
        """Run the step whose input token sits at cache column ``column`` (known on the host)."""
        # the attention kernel skips unwritten columns itself: one window, one captured step, for them all
        window = self.length if self.fused else min(self.length, (column // WINDOW + 1) * WINDOW)
        if not self.cuda_graphs:
            self._decode(window)
            return
        if window not in self.graphs:
            self.graphs[window] = self._capture(window)
        self.graphs[window].replay()

    def compacted(self, live: torch.Tensor) -> DecodeState:
        """The rows ``live`` (ascending indices) as a state of their own that goes on where this one is, its
        cache in this cache's storage (so this state must not decode again before its next prefill); its
        ``row_map`` names their rows in the batch, for the row hook and :meth:`write_back`."""
        twin = copy.copy(self)  # model, settings, graph pool; every per-row buffer is replaced below
        twin.rows, twin.graphs = live.numel(), {}
        twin.cache = self.cache.compacted(live)
        twin.cache_argument = compat.cache_argument(self.backbone, twin.cache)
        for name in ("key_valid", "current", "position", "finished", "keys", "tokens", "logprobs"):
            setattr(twin, name, getattr(self, name).index_select(0, live))
        twin.column, twin.step_index = self.column.clone(), self.step_index.clone()
        rows = live.tolist()
        twin.row_map = rows if self.row_map is None else [self.row_map[i] for i in rows]
        return twin

    def write_back(self, compact: DecodeState) -> None:
        """Copy a compacted state's tokens and log-probs into this (its batch's first) state's rows."""
        rows = torch.tensor(compact.row_map, device=self.tokens.device)
        self.tokens.index_copy_(0, rows, compact.tokens)
        self.logprobs.index_copy_(0, rows, compact.logprobs)

    def _capture(self, window: int) -> torch.cuda.CUDAGraph:
        # warm-up runs a real step (cuBLAS setup, allocator); the bookkeeping it advances is put back, and
        # the cache column it writes is written again by the replay before anything reads it
        bookkeeping = (self.current, self.position, self.column, self.step_index, self.finished)
        saved = [t.clone() for t in bookkeeping]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._decode(window)
        torch.cuda.current_stream().wait_stream(stream)
        # torch.cuda.graph empties the allocator's cache first, which these captures need: captured by hand
        # without it, a 20-variant scan's fifth joint evaluation ran out of memory with 32 GB cached outside the
        # graphs' pools, which a capture cannot free
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._decode(window)
        for buffer, value in zip(bookkeeping, saved, strict=True):
            buffer.copy_(value)
        return graph


# ------------------------------------------------------------------------------------------- generator


def _autocast_dtype(model: nn.Module, device_type: str) -> torch.dtype | None:
    """The dtype to autocast to: the caller's autocast dtype if one is active, else bf16/fp16 when some
    weights are in it and others are not (trained tensors are kept in float32), else None."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtypes = {p.dtype for p in model.parameters()}
    low = [d for d in (torch.bfloat16, torch.float16) if d in dtypes]
    return low[0] if low and len(dtypes) > 1 else None


class FastGenerator:
    """Sampling through :class:`DecodeState` in row batches of ``batch_size``; CUDA graphs on CUDA.

    The state (cache and captured steps) is kept between calls of the same shape; it is rebuilt when the
    shape or sampling settings change or when a parameter was reallocated (graphs hold raw pointers).
    ``ignore_eos`` generates exactly ``max_new_tokens`` per row (EOS is never sampled), for benchmarks.
    ``row_hook(start, stop, rows)`` is called before every forward with the rows it covers (layer variants
    route rows to their own layers by it): rows ``start``-``stop`` of the batch, or, after the batch was
    compacted to its unfinished rows, of ``rows`` (their indices in the batch). ``compact``: compact batches
    (:func:`compact_now`); None = without CUDA graphs only (with them each compaction captures new steps: on an
    H200, ``bench/rl_speed.py --sections compaction`` found that a quarter fewer row-steps did not pay for them),
    never under ``compiled``, which runs decode steps through torch.compile (each new batch shape would compile
    again). ``compact_below``: the share of rows still going at or below which a check compacts (None:
    ``COMPACT_BELOW`` with CUDA graphs, else 1.0, at every check that finds a finished row). ``stats`` says what
    the last call decoded.
    ``kernels`` runs decode attention and sampling in Triton kernels (:mod:`.kernels`): None = where they
    run by default (CUDA sm80+ with Triton installed), True = always (on CPU through Triton's interpreter,
    for tests), False = never.
    """

    def __init__(self, model: nn.Module, tokenizer, batch_size: int = 256, cuda_graphs: bool | None = None,
                 ignore_eos: bool = False, row_hook=None, compiled: bool = False, kernels: bool | None = None,
                 compact: bool | None = None, compact_below: float | None = None):
        self.model, self.tokenizer, self.batch_size, self.ignore_eos = model, tokenizer, batch_size, ignore_eos
        self.row_hook, self.compiled = row_hook, compiled
        self.stats = {"row_steps": 0, "compactions": 0}  # decode steps x rows decoded, by the last call
        self.eos_ids = eos_token_ids(model, tokenizer)
        device = next(model.parameters()).device
        self.cuda_graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.compact = (not self.cuda_graphs if compact is None else compact) and not compiled
        self.compact_below = compact_below if compact_below is not None else (
            COMPACT_BELOW if self.cuda_graphs else 1.0)
        if kernels and (reason := _kernels.unavailable_reason(device)):
            raise ValueError(f"the fast engine's Triton kernels cannot run: {reason}")
        self.kernels = _kernels.available(device) if kernels is None else kernels
        self.state: DecodeState | None = None
        self._weights: tuple = ()

    def release(self) -> None:
        """Free the cache and captured steps (the next call rebuilds them)."""
        self.state = None

    @property
    def state_bytes(self) -> int:
        return 0 if self.state is None else self.state.cache.nbytes

    def _state_for(self, rows: int, length: int, temperature: float, top_p: float) -> DecodeState:
        weights = tuple(p.data_ptr() for p in self.model.parameters())
        if self.state is None or weights != self._weights or not self.state.fits(rows, length, temperature, top_p):
            self.state = None  # free the old cache before allocating the new one
            # headroom of one window: the next batch's prompts may be a little longer
            padded = -(-(length + WINDOW) // WINDOW) * WINDOW
            self.state = DecodeState(self.model, rows, padded, temperature, top_p, self.eos_ids,
                                     self.tokenizer.pad_token_id, self.cuda_graphs, self.ignore_eos, self.row_hook,
                                     self.compiled, self.kernels)
            self._weights = weights
        return self.state

    def _generate_rows(self, prompt_ids, prompt_mask, keys, max_new_tokens, temperature, top_p):
        rows, width = prompt_ids.shape
        state = self._state_for(rows, width + max_new_tokens, temperature, top_p)
        state.prefill(prompt_ids, prompt_mask, keys)
        current, done = state, 1
        for done in range(1, max_new_tokens):
            if done % CHECK_EVERY == 0:
                going = int(current.rows - current.finished.sum())  # one host sync per check
                if not going:
                    break
                if self.compact and compact_now(going, current.rows, max_new_tokens - done, self.compact_below):
                    if current is not state:
                        state.write_back(current)
                    current = current.compacted((~current.finished).nonzero()[:, 0])
                    self.stats["compactions"] += 1
            current.decode(width + done - 1)
            self.stats["row_steps"] += current.rows
        else:
            done = max_new_tokens
        if current is not state:
            state.write_back(current)
            state.row_hook(0, rows)  # routing as for the whole batch again, for whatever runs next
        return state.tokens[:, :done].clone(), state.logprobs[:, :done].clone()

    @torch.no_grad()
    def generate(self, prompts: list[str], num_samples: int, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, seeds: list[int] | None = None,
                 first_row: int = 0) -> RolloutBatch:
        """``num_samples`` completions per prompt. The rows form ``len(seeds)`` equal blocks, block k
        sampling from the random stream of ``seeds[k]`` (one seed drawn from the global generator when
        None), so a block's completions are those it would get alone; its rows are rows ``first_row``, ...
        of that stream (a share of a larger batch draws what it draws there)."""
        tok, model = self.tokenizer, self.model
        prompt_ids, prompt_mask = encode_prompts(tok, prompts, num_samples, next(model.parameters()).device)
        rows = prompt_ids.shape[0]
        seeds = seeds or [int(torch.randint(0, 2**62, ()).item())]
        if rows % len(seeds):
            raise ValueError(f"{rows} rows do not split into {len(seeds)} equal blocks, one per seed")
        keys = row_keys(seeds, rows // len(seeds), prompt_ids.device, first_row)
        # with a row hook (routing rows to layer variants) every row is in one batch: a captured step
        # bakes in the routing it was captured with
        batch_size = rows if self.row_hook else self.batch_size
        dtype = _autocast_dtype(model, prompt_ids.device.type)
        # autocast's cache of cast weights must stay off: a captured step would read another graph's memory
        autocast = nullcontext() if dtype is None else torch.autocast(
            prompt_ids.device.type, dtype=dtype, cache_enabled=False)
        was_training = model.training
        model.eval()
        self.stats = {"row_steps": 0, "compactions": 0}
        tokens, logprobs = [], []
        try:
            with cached_attention_for(model, self.kernels), autocast:
                for start in range(0, rows, batch_size):
                    part = slice(start, start + batch_size)
                    t, lp = self._generate_rows(prompt_ids[part], prompt_mask[part], keys[part], max_new_tokens,
                                                temperature, top_p)
                    tokens.append(t)
                    logprobs.append(lp)
        except Exception as error:
            if self.kernels and _kernels.raised_by_triton(error):
                raise OneLayerError(f"the fast engine's Triton kernels failed ({type(error).__name__}: "
                                    f"{first_line(error)}); rerun with --no-fused-kernels") from error
            raise
        finally:
            model.train(was_training)
        return assemble_batch(tok, prompt_ids, prompt_mask, pad_columns(tokens, tok.pad_token_id), self.eos_ids,
                              pad_columns(logprobs, 0.0))
