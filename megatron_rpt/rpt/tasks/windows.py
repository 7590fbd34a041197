"""From corpus documents to the positions a proxy scores: `Document`s of the --input jsonl
(`iter_documents`, through `data.jsonl`), their policy tokens and byte-exact token bytes
(`document_tokens`), the scoring `Window`s (`plan_windows`), the candidate positions
(`_candidates`), the tasks kept per document (`_doc_tasks`) and the held-out documents
(`heldout_indices`).

Long documents are cut into windows of `--proxy-seq-length` tokens that overlap by
`--min-context-tokens`, and each window scores only the positions that have at least that much
context inside it (a position at a window start would otherwise look artificially uncertain).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

from megatron_rpt.data.jsonl import iter_records
from megatron_rpt.rpt.tasks.format import Task, TaskError, splits_for

if TYPE_CHECKING:
    from megatron_rpt.rpt.tasks.builder import BuildConfig


@dataclass
class Document:
    index: int      # 0-based over all inputs, in order
    doc_id: str
    source: str     # "file:line"
    text: str


def _labels(files: Sequence[str]) -> list[str]:
    names = [os.path.basename(f) for f in files]
    return names if len(set(names)) == len(names) else list(files)


def iter_documents(files: Sequence[str], key: str = "text", doc_id_key: Optional[str] = None) -> Iterator[Document]:
    """The documents of jsonl files (read by `data.jsonl.iter_records`: a bad line is one error
    naming file:line). doc_id: `doc_id_key`'s value (unique), else "<file name>:<line>"."""
    seen: set[str] = set()
    labels = dict(zip(files, _labels(files)))
    for index, record in enumerate(iter_records(files, [key])):
        if doc_id_key is not None:
            value = record.obj.get(doc_id_key)
            if not isinstance(value, (str, int)) or isinstance(value, bool) or str(value) == "":
                raise TaskError(f"{record.where}: missing or empty --doc-id-key {doc_id_key!r}")
            doc_id = str(value)
            if doc_id in seen:
                raise TaskError(f"{record.where}: duplicate document id {doc_id!r} (--doc-id-key {doc_id_key})")
            seen.add(doc_id)
        else:
            doc_id = f"{labels[record.path]}:{record.line}"
        yield Document(index, doc_id, record.where, record.texts[0])


def document_tokens(tokenizer, doc: Document) -> tuple[list[int], list[bytes], bytes]:
    """(ids, per-token bytes, UTF-8 text) of a document; TaskError naming it when the tokens'
    bytes are not exactly the text's (byte-exact targets need it)."""
    try:
        text = doc.text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TaskError(f"{doc.source}: the text is not encodable as UTF-8 ({e.reason} at character "
                        f"{e.start})") from None
    ids = tokenizer.tokenize(doc.text)
    pieces = tokenizer.token_bytes(ids, at_start=True)
    joined = b"".join(pieces)
    if joined != text:
        k = next((i for i, (a, b) in enumerate(zip(joined, text)) if a != b), min(len(joined), len(text)))
        raise TaskError(f"{doc.source}: the {type(tokenizer).__name__}'s tokens do not reproduce the document's "
                        f"bytes (first difference at byte {k}: tokens give {joined[k:k + 12]!r}, text has "
                        f"{text[k:k + 12]!r}); RPT targets must be byte-exact: use a byte-level tokenizer without "
                        "normalisation")
    return ids, pieces, text


@dataclass
class Window:
    doc: int                 # position of its document in the chunk
    start: int               # tokens[start:end] are its input
    tokens: list[int]
    targets: list[int]       # document positions t it scores (logit index t - start - 1)


def plan_windows(n_tokens: int, seq_length: int, min_context: int) -> list[tuple[int, int]]:
    """(start, end) input ranges covering target positions min_context..n_tokens-1, each position
    scored in exactly one window with at least `min_context` tokens of context inside it: window k
    scores (end_{k-1}, end_k] and starts min_context tokens before its first target."""
    c = max(1, min_context)
    if seq_length <= c:
        raise TaskError(f"--proxy-seq-length {seq_length} must exceed --min-context-tokens {min_context}")
    last = n_tokens - 1
    if last < c:
        return []
    out, start, end = [], 0, min(seq_length, last)
    out.append((start, end))
    while end < last:
        start = end + 1 - c
        end = min(start + seq_length, last)
        out.append((start, end))
    return out


def heldout_indices(n_docs: int, heldout: float, seed: int) -> set[int]:
    """Document indices of the held-out split: a count (>= 1) or fraction (< 1) of n_docs, seeded."""
    k = int(heldout) if heldout >= 1 else round(heldout * n_docs)
    if k > n_docs:
        raise TaskError(f"--heldout-docs {int(heldout)} exceeds the {n_docs} documents of --input")
    return set(random.Random(seed).sample(range(n_docs), k))


def _doc_tasks(doc: Document, ids: list[int], pieces: list[bytes], text: bytes, targets: list[int],
               entropies: list[float], cfg: BuildConfig) -> list[Task]:
    kept = [(t, e) for t, e in zip(targets, entropies) if e > cfg.entropy_threshold]
    if cfg.max_tasks_per_doc is not None and len(kept) > cfg.max_tasks_per_doc:
        # Seeded by (seed, doc_id): the same choice whatever the chunking, batch size or resume point.
        kept = sorted(random.Random(f"{cfg.seed}:{doc.doc_id}").sample(kept, cfg.max_tasks_per_doc))
    offsets = [0]
    for p in pieces:
        offsets.append(offsets[-1] + len(p))
    tasks = []
    for t, e in kept:
        target = ids[t:t + cfg.target_tokens]
        tasks.append(Task(f"{doc.doc_id}:{t}", doc.doc_id, t, text[:offsets[t]].decode("utf-8"), ids[:t], target,
                          [p.hex() for p in pieces[t:t + cfg.target_tokens]], e, splits_for(e)))
    return tasks


def _candidates(pieces: list[bytes], text: bytes, min_context: int) -> list[int]:
    """Target positions t >= min_context whose context bytes (tokens[:t]) end on a UTF-8 character
    boundary (so the context is valid text) and that have a target token."""
    out, offset = [], 0
    for t, p in enumerate(pieces):
        if t >= min_context and (offset == len(text) or text[offset] & 0xC0 != 0x80):
            out.append(t)
        offset += len(p)
    return out
