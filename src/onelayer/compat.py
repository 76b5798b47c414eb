"""Every assumption onelayer makes about other libraries' internals, in one place.

Everywhere else onelayer uses public APIs. What is here is not promised by transformers or torch
and has changed between releases, so each piece says what it assumes and what breaks without it.
The tested range is in ``pyproject.toml`` (``make test`` runs the locked versions,
``make test-oldest`` / ``make test-latest`` the ends of the range). The fast engine also checks
itself against the model's own forward on first use in a process
(:func:`onelayer.rollout.selfcheck.fast_engine_problem`), so a broken assumption there makes a run
fall back to ``generate`` instead of sampling wrong tokens.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager

from torch import nn

# ------------------------------------------------------------------------------ transformers: backbone


def backbone(model: nn.Module) -> nn.Module:
    """The module of a causal LM that returns its final hidden states (``last_hidden_state``), before the head.

    Assumes: that is ``model.base_model``, found through the class's ``base_model_prefix``, except where the
    prefix names a wrapper the model lacks: Llama 4's text-only causal LM keeps the composite model's prefix
    (``language_model``), so ``base_model`` is the causal LM itself; its backbone is then its child ``model``
    (or ``transformer``, GPT-2's name).
    """
    base = model.base_model
    if base is not model:
        return base
    for name in ("model", "transformer"):
        child = getattr(model, name, None)
        if isinstance(child, nn.Module):
            return child
    from .errors import OneLayerError

    raise OneLayerError(f"cannot find the backbone of {type(model).__name__} (base_model is the model itself and it "
                        "has no child 'model' or 'transformer'): this architecture is not supported, please open "
                        "an issue")


# ------------------------------------------------------------------------------ transformers: KV cache


def cache_base() -> type:
    """The class a custom KV cache must subclass.

    Assumes: attention modules call ``cache.update(key, value, layer_idx, ...)`` and attend over the
    two tensors it returns; ``Cache(layers=[])`` is a cache without transformers' per-layer objects
    (ours keeps its own tensors). What follows ``layer_idx`` changed: 5.17 passes ``cache_kwargs``
    positionally, 5.24 ``kwargs=`` by keyword, so ``update`` must take (and ignore) both.
    """
    from transformers.cache_utils import Cache

    return Cache


@functools.cache
def _cache_keyword(forward) -> str:
    parameters = inspect.signature(forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_argument(backbone: nn.Module, cache) -> dict:
    """The keyword argument that hands ``cache`` to ``backbone`` (a model's :func:`backbone`).

    Assumes: the backbone's forward takes the cache as ``past_key_values`` (5.17) or ``cache`` (5.24
    renamed it; the old name is deprecated until 5.40). ``inspect`` sees through transformers'
    decorators, which keep ``__wrapped__``.
    """
    return {_cache_keyword(type(backbone).forward): cache}


# Assumes (no code needed): a boolean ``[B, 1, S, W]`` mask, or a dict of them by layer type
# ("full_attention", "sliding_attention"), passed as ``attention_mask`` reaches the attention function
# unchanged (``create_causal_mask`` returns a 4D mask as it is; hybrid models pick their entry by layer type).

# ------------------------------------------------------------------- transformers: attention registry


def default_attention(config) -> str | None:
    """The attention implementation to ask for when the user names none (None: transformers' choice).

    Assumes: 5.17 gives Gemma 2 SDPA attention, which drops its attention-logit softcap without a word
    (log-probs then differ from the model's own eager forward); 5.24 picks eager for it. Eager applies it.
    """
    return "eager" if getattr(config.get_text_config(), "attn_logit_softcapping", None) else None


_registered: set[str] = set()


def register_attention(name: str, function) -> None:
    """Register ``function`` as attention implementation ``name`` (once per process).

    Assumes: ``function(module, query [B, Hq, S, D], key, value [B, Hkv, W, D], attention_mask,
    scaling=, dropout=, softcap=, **kwargs)`` returns ``(output [B, S, Hq, D], weights)``, as
    transformers' own implementations do.
    """
    if name in _registered:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(name, function)
    _registered.add(name)


@contextmanager
def attention_implementation(model: nn.Module, name: str):
    """Within the block, ``model``'s attention modules use the registered implementation ``name``.

    Assumes: attention modules look up ``config._attn_implementation`` (private) at every forward,
    not once at construction, and multimodal models keep a second one on their text config.
    """
    configs = {id(c): c for c in (model.config, model.config.get_text_config())}.values()
    saved = [(c, c._attn_implementation) for c in configs]
    for c, _ in saved:
        c._attn_implementation = name
    try:
        yield
    finally:
        for c, previous in saved:
            c._attn_implementation = previous


# ------------------------------------------------------------------------------ transformers: decoder layers


def skipped_layer_output(hidden_states, layer: nn.Module):
    """What a decoder layer that does nothing returns for ``hidden_states``.

    Assumes: decoder layers return their output hidden states as a tensor (5.x; 4.x returned a tuple), and
    the model's layer loop reads only ``attention_type`` off a layer besides calling it (hybrid models pick
    their mask by it), which :class:`onelayer.variants.SkippedLayer` copies.
    """
    return hidden_states


# ------------------------------------------------------------------------------ transformers: GGUF


def clear_quantized_flags(model: nn.Module) -> None:
    """Unmark a model loaded from a GGUF file as quantized.

    Assumes: transformers dequantizes GGUF weights on load but keeps ``hf_quantizer``,
    ``is_quantized`` and ``config.quantization_config`` set, which makes ``save_pretrained`` and
    ``Trainer`` refuse the model although its weights are plain tensors.
    """
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.is_quantized = False


# ------------------------------------------------------------------------------ transformers: linear maps


def linear_maps() -> tuple[type, ...]:
    """The module classes that are a model's linear maps, as PEFT's ``target_modules="all-linear"`` counts them.

    Assumes: besides ``nn.Linear``, GPT-2-style models use ``transformers.pytorch_utils.Conv1D`` (a linear
    map with its weight transposed), which PEFT adapts too.
    """
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


# ------------------------------------------------------------------------------------------ torch


def allow_recompiles(graphs: int) -> None:
    """Let torch.compile keep up to ``graphs`` graphs per function.

    Assumes: ``torch._dynamo.config.cache_size_limit`` (private) bounds them; its default, 8, would
    evict graphs that onelayer reuses (every batch shape, window and layer kind is a graph of its own).
    """
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, graphs)


def set_compiled_call(module: nn.Module, call) -> None:
    """Make ``module(...)`` run ``call`` instead of its forward (None: back to the forward).

    Assumes: ``nn.Module.__call__`` runs ``_compiled_call_impl`` when it is set, which is how
    ``Module.compile`` works; setting it per module lets every decoder layer share one compiled code.
    """
    module._compiled_call_impl = call


def compiled_call(module: nn.Module):
    """What :func:`set_compiled_call` set on ``module`` (None when nothing)."""
    return module._compiled_call_impl


def plain_call(module: nn.Module):
    """The module's own call path (what :func:`set_compiled_call` replaces), to compile."""
    return module._call_impl


def raised_by_compiler(err: BaseException) -> bool:
    """Whether ``err`` comes from torch.compile (Dynamo tracing or Inductor code generation)."""
    return type(err).__module__.startswith(("torch._dynamo", "torch._inductor"))


__all__ = ["allow_recompiles", "attention_implementation", "cache_argument", "cache_base", "clear_quantized_flags",
           "compiled_call", "plain_call", "raised_by_compiler", "register_attention", "set_compiled_call"]
