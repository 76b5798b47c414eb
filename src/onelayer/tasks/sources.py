"""Where task rows come from: local JSONL files and Hugging Face datasets, and a stable hash split."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from .. import jsonl
from ..errors import OneLayerError
from .base import Example, dedup_against


def check_split(split: str) -> str:
    if split not in ("train", "eval"):
        raise OneLayerError(f"unknown split '{split}': use train or eval")
    return split


def read_jsonl(path: str) -> list[dict]:
    """The JSON objects of a task's ``.jsonl`` file (or ``.jsonl.gz``), one per non-empty line."""
    if not jsonl.exists(path):
        raise OneLayerError(f"task file {path} does not exist: check the path")
    rows = jsonl.read_jsonl(path)
    if not rows:
        raise OneLayerError(f"task file {path} has no examples (no non-empty line): add one JSON object per line, "
                            'e.g. {"question": "2 + 3?", "answer": "5"}')
    return rows


def load_hf_splits(dataset: str, config: str | None, train_split: str, eval_split: str) -> dict:
    """``{"train": rows, "eval": rows}`` from ``datasets.load_dataset`` (a hub id, or a local folder
    or file)."""
    try:
        import datasets
    except ImportError as err:
        raise OneLayerError("hf: tasks need the datasets package: pip install 'onelayer[datasets]'") from err
    try:
        return {split: datasets.load_dataset(dataset, config, split=name)
                for split, name in (("train", train_split), ("eval", eval_split))}
    except Exception as err:
        raise OneLayerError(f"cannot load dataset '{dataset}' ({str(err).splitlines()[0]}): check the id, "
                            "config and split names, or that it is cached") from err


def hash_percent(text: str) -> float:
    """A stable pseudo-random number in [0, 100) for ``text``."""
    return int(hashlib.sha1(text.strip().encode()).hexdigest()[:8], 16) / 0x1_0000_0000 * 100


def hash_split(examples: list[Example], eval_percent: float) -> dict[str, list[Example]]:
    """Split by a hash of the question: stable whatever the file order, and identical questions
    always land on the same side."""
    held = [e for e in examples if hash_percent(e.question) < eval_percent]
    return {"eval": held, "train": dedup_against([e for e in examples if hash_percent(e.question) >= eval_percent],
                                                 held)}


def file_splits(read: Callable[[str], list[Example]], path: str, eval_file: str | None,
                eval_percent: float) -> dict[str, list[Example]]:
    """Splits of a local file read by ``read``: ``eval_file`` is the eval split when given (and
    train drops its questions); otherwise ``eval_percent`` of the questions, by hash, are held out."""
    examples = read(path)
    if eval_file:
        held = read(eval_file)
        return {"eval": held, "train": dedup_against(examples, held)}
    return hash_split(examples, eval_percent)


def dataset_splits(convert: Callable[[object, str], list[Example]], dataset: str, config: str | None,
                   train_split: str, eval_split: str) -> dict[str, list[Example]]:
    """Splits of a Hugging Face dataset: ``convert(rows, where)`` turns each split's rows into
    examples; train drops the eval split's questions."""
    loaded = load_hf_splits(dataset, config, train_split, eval_split)
    held = convert(loaded["eval"], f"{dataset}/{eval_split}")
    return {"eval": held, "train": dedup_against(convert(loaded["train"], f"{dataset}/{train_split}"), held)}
