"""JSON-lines files, the one format of onelayer's logs and per-example results.

Every reader goes through :func:`read_jsonl`, which also reads gzip-compressed files (``.jsonl.gz``,
how committed results are kept small): a path ``x.jsonl`` that does not exist is read from
``x.jsonl.gz`` when that exists.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from .errors import OneLayerError


def gz_twin(path: Path) -> Path:
    """The compressed copy of ``path`` (``x.jsonl`` -> ``x.jsonl.gz``)."""
    return path.with_name(path.name + ".gz")


def resolve(path: str | Path) -> Path:
    """``path``, or its ``.gz`` twin when only that exists."""
    path = Path(path).expanduser()
    zipped = gz_twin(path)
    return zipped if not path.is_file() and zipped.is_file() else path


def exists(path: str | Path) -> bool:
    return resolve(path).is_file()


def read_jsonl(path: str | Path, missing_ok: bool = True) -> list[dict]:
    """The JSON objects of a JSON-lines file, one per non-empty line. A file that does not exist (yet) has
    none, unless ``missing_ok`` is false; a malformed line is a one-line error naming the file and line."""
    file = resolve(path)
    if not file.is_file():
        if missing_ok:
            return []
        raise OneLayerError(f"{path} does not exist: check the path")
    opener = gzip.open if file.suffix == ".gz" else open
    rows = []
    with opener(file, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise OneLayerError(f"{file}:{number} is not valid JSON ({err.msg}): fix or remove that line") from err
    return rows


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Write ``rows`` as a JSON-lines file (gzip-compressed when ``path`` ends in ``.gz``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def append_jsonl(path: str | Path, row: dict) -> None:
    """Add one row to a JSON-lines file (a log that grows as a run goes)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
