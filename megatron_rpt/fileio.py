"""Atomic file writes: the one helper every writer of a small result file uses.

A file is written under a unique temporary name in its own folder, flushed and fsynced, then
renamed over the destination (`os.replace` is atomic on one filesystem): a reader, a concurrent
writer or a crash never sees a partial file, and on an error the temporary file is removed and the
previous file (if any) stays. Folders (checkpoints, converted models) are published by
`megatron_rpt.checkpoint`, large binary outputs by their writers (`data/indexed.py`).
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import IO, Any, Iterable, Iterator


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, encoding: str = "utf-8") -> Iterator[IO]:
    """`with atomic_open(path) as f:` writes `path` atomically (text mode "w" or binary "wb")."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": encoding})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared like any other file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """One json document, indented and key-sorted (stable diffs of metadata files)."""
    with atomic_open(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> None:
    """One json record per line (non-ASCII kept as is)."""
    with atomic_open(path) as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
