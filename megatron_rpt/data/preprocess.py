"""jsonl -> Megatron indexed datasets: the library behind tools/preprocess_data.py.

Streaming: input is read in blocks of `block_size` lines, each block tokenized by a process pool
(`map` keeps order, so the output is identical for any --workers) and appended before the next
block is read; memory is bounded by one block whatever the input size. Inputs may be several
files, globs and .gz. Bad lines (malformed JSON, missing key, non-string value, empty document,
invalid UTF-8) stop the run with `file:line: reason`, or are skipped and reported with
`skip_bad_lines`. Outputs are `{prefix}_{key}_document.bin/.idx`, published atomically.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import time
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Iterator, Optional, Sequence

from megatron_rpt.data.tokenizers import build_tokenizer


class BadInputError(ValueError):
    """A malformed input line; the message starts with file:line."""


@dataclass
class PreprocessStats:
    documents: int = 0
    tokens: int = 0
    bytes_read: int = 0
    skipped: int = 0
    skipped_examples: list = field(default_factory=list)
    outputs: dict = field(default_factory=dict)
    seconds: float = 0.0


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Files and globs -> sorted existing files; a clear error for a pattern that matches nothing."""
    files: list[str] = []
    for pattern in inputs:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches or not all(os.path.isfile(m) for m in matches):
            raise FileNotFoundError(f"--input: {pattern} matches no file")
        files.extend(matches)
    return files


def _open(path: str) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _read_lines(files: list[str]) -> Iterator[tuple[str, int, bytes]]:
    for path in files:
        with _open(path) as f:
            for lineno, raw in enumerate(f, 1):
                yield path, lineno, raw


_TOKENIZER = None
_KEYS: tuple = ()
_APPEND_EOD = False


def _init_worker(tok_kwargs: dict, keys: tuple, append_eod: bool) -> None:
    global _TOKENIZER, _KEYS, _APPEND_EOD
    _TOKENIZER = build_tokenizer(**tok_kwargs)
    _KEYS, _APPEND_EOD = keys, append_eod


def _encode(item: tuple[str, int, bytes]):
    """-> ("ok", {key: ids}) or ("bad", "file:line: reason")."""
    path, lineno, raw = item
    where = f"{path}:{lineno}"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return "bad", f"{where}: invalid UTF-8 at byte {e.start}"
    if not line.strip():
        return "skip", None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return "bad", f"{where}: malformed JSON ({e.msg} at column {e.colno})"
    if not isinstance(obj, dict):
        return "bad", f"{where}: expected a JSON object, got {type(obj).__name__}"
    out = {}
    for key in _KEYS:
        if key not in obj:
            return "bad", f"{where}: missing key {key!r}"
        value = obj[key]
        if not isinstance(value, str):
            return "bad", f"{where}: key {key!r} is {type(value).__name__}, not a string"
        if not value.strip():
            return "bad", f"{where}: key {key!r} is an empty document"
        try:
            ids = _TOKENIZER.tokenize(value)
        except Exception as e:  # noqa: BLE001 - e.g. NullTokenizer text that is not ids
            return "bad", f"{where}: key {key!r} cannot be tokenized ({e})"
        if _APPEND_EOD:
            ids = list(ids) + [_TOKENIZER.eod]
        out[key] = ids
    return "ok", out


def preprocess(inputs: Sequence[str], output_prefix: str, *, json_keys: Sequence[str] = ("text",),
               tokenizer_type: str, tokenizer_model: Optional[str] = None, vocab_file: Optional[str] = None,
               merge_file: Optional[str] = None, vocab_size: Optional[int] = None, append_eod: bool = False,
               workers: int = 1, skip_bad_lines: bool = False, block_size: int = 2048,
               log_interval: int = 0, progress: bool = True) -> PreprocessStats:
    """Tokenize jsonl documents into `{output_prefix}_{key}_document.bin/.idx` (see module docstring)."""
    if workers < 1:
        raise ValueError(f"--workers must be >= 1 (got {workers})")
    files = expand_inputs(inputs)
    tok_kwargs = dict(tokenizer_type=tokenizer_type, tokenizer_model=tokenizer_model, vocab_file=vocab_file,
                      merge_file=merge_file, vocab_size=vocab_size)
    tokenizer = build_tokenizer(**tok_kwargs)  # fail before starting workers, and for vocab size
    # Imported here: megatron.core takes seconds to import and expand_inputs users don't need it.
    from megatron_rpt.data.indexed import AtomicIndexedWriter
    keys = tuple(json_keys)
    writers = {k: AtomicIndexedWriter(f"{output_prefix}_{k}_document", tokenizer.vocab_size) for k in keys}
    stats = PreprocessStats()
    # .gz sizes are compressed while we count decompressed bytes: no total (the bar just counts).
    total = None if any(f.endswith(".gz") for f in files) else sum(os.path.getsize(f) for f in files)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="preprocess", dynamic_ncols=True)
    t0 = time.perf_counter()
    pool = get_context("fork").Pool(workers, _init_worker, (tok_kwargs, keys, append_eod)) if workers > 1 else None
    if pool is None:
        _init_worker(tok_kwargs, keys, append_eod)
    try:
        lines = _read_lines(files)
        while True:
            block = [x for _, x in zip(range(block_size), lines)]
            if not block:
                break
            results = pool.map(_encode, block, chunksize=64) if pool else [_encode(x) for x in block]
            for (path, lineno, raw), (status, payload) in zip(block, results):
                stats.bytes_read += len(raw)
                if status == "bad":
                    if not skip_bad_lines:
                        raise BadInputError(payload + " (use --skip-bad-lines to skip such lines)")
                    stats.skipped += 1
                    if len(stats.skipped_examples) < 5:
                        stats.skipped_examples.append(payload)
                elif status == "ok":
                    for key, ids in payload.items():
                        writers[key].add_document(ids)
                        stats.tokens += len(ids)
                    stats.documents += 1
                    if log_interval and stats.documents % log_interval == 0:
                        msg = (f"processed {stats.documents} documents, {stats.tokens} tokens "
                               f"({stats.bytes_read / 2**20 / max(time.perf_counter() - t0, 1e-9):.1f} MB/s)")
                        if bar is not None:
                            bar.write(msg)  # keeps the progress bar on its own line
                        else:
                            print(msg, flush=True)
            if bar is not None:
                bar.update(sum(len(raw) for _, _, raw in block))
                bar.set_postfix(docs=stats.documents)
        if stats.documents == 0:
            raise BadInputError(f"--input: no documents in {', '.join(files)}"
                                + (f" ({stats.skipped} bad lines skipped)" if stats.skipped else ""))
        for key, writer in writers.items():
            stats.outputs[key] = writer.finalize()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()
    stats.seconds = time.perf_counter() - t0
    return stats
