"""The one reader of jsonl corpora: --input expansion, .gz, lines, JSON, text keys, bad-input errors.

Used by corpus preprocessing (`data.preprocess`: its workers check each line of their byte chunks
with `parse_line` and `texts_of`), tokenizer training (`iter_texts`), RPT task building
(`iter_records`) and the RPT task-file loader (`iter_lines`, `parse_line`). One rule for all of
them: bad input is one error naming the file and line; nothing is skipped or truncated silently
(preprocessing's documented --skip-bad-lines is the one exception, and it counts and reports
what it skips).

Semantics:
- `expand_inputs`: each --input entry is a file or a glob; a glob's matches are sorted; an entry
  naming or matching no file, or a match that is not a regular file (a folder), is a
  FileNotFoundError naming the entry; a file named twice (by two entries) is a BadInputError, as
  it would be read twice.
- A name ending in .gz is read gzip-decompressed; a corrupt or truncated .gz file is a
  BadInputError naming the file (never a partial read).
- Lines end at b"\\n" only (JSON Lines), so line numbers are the same in every tool and for any
  chunking; a line may end in "\\r\\n". Blank (whitespace-only) lines are skipped, and counted in
  line numbers.
- Every other line is UTF-8 holding one JSON value, parsed by orjson with the standard library as
  fallback (it accepts NaN, integers beyond 64 bits and lone surrogates, which orjson rejects), so
  what is accepted is exactly what `json` accepts.
- A document is a JSON object whose every asked key (--json-keys) holds a string with
  non-whitespace text: not an object, a missing key, a non-string value and an empty document are
  each an error (reason strings below, after `file:line: `).
- Plain-text files (`iter_texts` only: a name not ending in .json/.jsonl[.gz]) yield their lines
  verbatim, each checked as UTF-8.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import json
import os
import zlib
from dataclasses import dataclass
from typing import IO, Iterator, Sequence

import orjson

JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")


class BadInputError(ValueError):
    """Bad input data; the message starts with `file:line` (or the file, for a corrupt .gz)."""


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """--input files and globs -> files (each glob's matches sorted), every one named once."""
    files: list[str] = []
    named_by: dict[str, str] = {}   # real path -> the entry that named it
    for pattern in patterns:
        magic = glob.has_magic(pattern)
        matches = sorted(glob.glob(pattern)) if magic else ([pattern] if os.path.exists(pattern) else [])
        if not matches:
            raise FileNotFoundError(f"--input: {pattern} matches no file (no such file"
                                    f"{' matches the pattern' if magic else ''})")
        for m in matches:
            if not os.path.isfile(m):
                raise FileNotFoundError(f"--input: {m}" + (f" (matched by {pattern})" if magic else "") +
                                        " is not a file")
            real = os.path.realpath(m)
            if real in named_by:
                raise BadInputError(f"--input: {m} is named twice (by {named_by[real]} and {pattern}); it would "
                                    "be read twice")
            named_by[real] = pattern
            files.append(m)
    return files


GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)


@contextlib.contextmanager
def gzip_errors(path: str) -> Iterator[None]:
    """Turns a corrupt or truncated .gz file's decompression error into a BadInputError naming it."""
    try:
        yield
    except GZIP_ERRORS as e:
        raise BadInputError(f"{path}: not a complete gzip file ({e})") from None


def open_binary(path: str) -> IO[bytes]:
    """The file's bytes, gzip-decompressed for a name ending in .gz (read it inside `gzip_errors`)."""
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def iter_lines(path: str, *, blank: bool = False) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line bytes with its newline) of a file; blank lines only with `blank`."""
    with gzip_errors(path), open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            if blank or raw.strip():
                yield lineno, raw


def parse_line(raw: bytes):
    """The JSON value of one line; ValueError with the reason (invalid UTF-8, malformed JSON)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"invalid UTF-8 at byte {e.start}") from None
    try:  # what orjson rejects but json accepts (NaN, integers beyond 64 bits, lone surrogates)
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed JSON ({e.msg} at column {e.colno})") from None


def texts_of(obj, keys: Sequence[str]) -> list[str]:
    """The document texts of a parsed line under `keys`; ValueError with the reason when it is not a
    JSON object, or a key is missing, not a string, or an empty (whitespace-only) document."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    texts = []
    for key in keys:
        if key not in obj:
            raise ValueError(f"missing key {key!r}")
        text = obj[key]
        if not isinstance(text, str):
            raise ValueError(f"key {key!r} is {type(text).__name__}, not a string")
        if not text.strip():
            raise ValueError(f"key {key!r} is an empty document")
        texts.append(text)
    return texts


@dataclass(frozen=True)
class Record:
    """One document line: where it is, its JSON object and its texts (one per key)."""

    path: str
    line: int
    obj: dict
    texts: list

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def iter_records(files: Sequence[str], keys: Sequence[str] = ("text",)) -> Iterator[Record]:
    """The documents of jsonl files, in order; BadInputError `file:line: reason` at the first bad line."""
    for path in files:
        for lineno, raw in iter_lines(path):
            try:
                obj = parse_line(raw)
                texts = texts_of(obj, keys)
            except ValueError as e:
                raise BadInputError(f"{path}:{lineno}: {e}") from None
            yield Record(path, lineno, obj, texts)


def iter_texts(files: Sequence[str], keys: Sequence[str] = ("text",)) -> Iterator[str]:
    """Texts of jsonl files (.jsonl/.json[.gz]: each line's `keys`, in order) and the lines of plain
    text files (verbatim, with their newline); BadInputError naming `file:line` for a bad line."""
    for path in files:
        if path.endswith(JSON_SUFFIXES):
            for record in iter_records([path], keys):
                yield from record.texts
            continue
        for lineno, raw in iter_lines(path, blank=True):
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise BadInputError(f"{path}:{lineno}: invalid UTF-8 at byte {e.start}") from None
