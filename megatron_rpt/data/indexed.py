"""Writing Megatron indexed datasets (.bin/.idx) atomically, streaming, and merging them.

The files are Megatron-Core's `MMIDIDX` format (read by `megatron.core.datasets.indexed_dataset.
IndexedDataset`, and so by Megatron-LM): `.bin` holds the token ids back to back; `.idx` holds a
header (magic, version 1, dtype code), the sequence and document counts, then int32 sequence
lengths, int64 byte pointers, int64 document indices (cumulative sequence counts, starting at 0).

Why not Megatron-Core's `IndexedDatasetBuilder`: it keeps every sequence length and document
index in Python lists until `finalize()` (about 40 bytes per sequence: tens of GB for a corpus
of a billion sentences) and takes one document at a time. `IndexedWriter` appends whole
numpy batches and spools the lengths and document indices to temporary files, so its memory is
constant whatever the corpus size; `finalize()` assembles the .idx from the spools block by block.

Atomicity: everything is written under `*.tmp` names and renamed only in `finalize()`; an
interrupted run leaves the previous pair (or nothing) behind, never a truncated pair that looks
valid. `abort()` removes the temporary files.
"""

from __future__ import annotations

import os
import shutil
import struct
from typing import Optional, Sequence

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# Megatron-Core's DType codes (megatron/core/datasets/indexed_dataset.py).
DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6,
               np.float32: 7, np.uint16: 8}
_BLOCK = 1 << 20  # sequences per block when assembling the .idx


def token_dtype(vocab_size: int) -> type:
    """uint16 when every id fits (the threshold Megatron-LM uses), else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def cast_tokens(tokens: np.ndarray, dtype: type, where: str) -> np.ndarray:
    """`tokens` as `dtype` (unchanged if already), refusing negative ids and ids the dtype cannot
    hold (no wrap-around)."""
    tokens = np.asarray(tokens)
    if tokens.dtype == dtype:
        return tokens
    if tokens.size and np.issubdtype(dtype, np.integer):
        top = np.iinfo(dtype).max
        if tokens.min() < 0 or tokens.max() > top:
            bad = tokens[(tokens < 0) | (tokens > top)][0]
            raise ValueError(f"token id {int(bad)} outside the {np.dtype(dtype).name} range of {where}")
    return tokens.astype(dtype)


def open_index(prefix: str, where: str = "input"):
    """Megatron-Core's reader of `prefix.idx` (memory-mapped), after `data.validate.check_prefix`:
    FileNotFoundError for a missing file, ValueError for an unreadable .idx or a .bin whose size
    does not match it (truncated, or from another run)."""
    from megatron_rpt.data.validate import check_prefix
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    for ext in (".bin", ".idx"):
        if not os.path.isfile(prefix + ext):
            raise FileNotFoundError(f"{where}: {prefix}{ext} not found")
    problems = check_prefix(prefix, where, allow_empty=True)
    if problems:
        raise ValueError(problems[0])
    return IndexedDataset(prefix, mmap=True).index


class IndexedWriter:
    """Append documents (one at a time or in numpy batches); `finalize()` publishes `.bin` + `.idx`.

    A document is one or more sequences (sentences with --split-sentences, else one sequence).
    """

    def __init__(self, prefix: str, vocab_size: Optional[int] = None, *, dtype: Optional[type] = None):
        if (vocab_size is None) == (dtype is None):
            raise ValueError("IndexedWriter needs exactly one of vocab_size or dtype")
        self.prefix = prefix
        self.dtype = np.dtype(dtype if dtype is not None else token_dtype(vocab_size)).type
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"{prefix}: unsupported token dtype {np.dtype(self.dtype).name}")
        parent = os.path.dirname(os.path.abspath(prefix))
        os.makedirs(parent, exist_ok=True)
        self._tmp = {ext: f"{prefix}{ext}.tmp" for ext in (".bin", ".idx", ".lengths", ".docs")}
        self._bin = open(self._tmp[".bin"], "wb")
        self._lengths = open(self._tmp[".lengths"], "wb")  # int32 per sequence
        self._docs = open(self._tmp[".docs"], "wb")        # int64 cumulative sequence count per document
        self.documents = 0
        self.sequences = 0
        self.tokens = 0

    def add_document(self, ids: Sequence[int], sentence_lengths: Optional[Sequence[int]] = None) -> None:
        """One document; `sentence_lengths` splits it into sequences (default: one)."""
        arr = np.asarray(ids, dtype=np.int64)
        lengths = [len(arr)] if sentence_lengths is None else list(sentence_lengths)
        self.add_batch(arr, np.asarray(lengths, dtype=np.int64), np.asarray([len(lengths)], dtype=np.int64))

    def add_batch(self, tokens: np.ndarray, sequence_lengths: np.ndarray, sequences_per_document: np.ndarray) -> None:
        """Documents back to back: `tokens` split by `sequence_lengths`, grouped by `sequences_per_document`."""
        tokens = np.asarray(tokens)
        lengths = np.asarray(sequence_lengths, dtype=np.int64)
        per_doc = np.asarray(sequences_per_document, dtype=np.int64)
        if int(lengths.sum()) != tokens.size or int(per_doc.sum()) != lengths.size:
            raise ValueError(f"{self.prefix}: inconsistent batch ({tokens.size} tokens, lengths sum "
                             f"{int(lengths.sum())}, {lengths.size} sequences, {int(per_doc.sum())} in documents)")
        if lengths.size and (lengths.min() < 0 or lengths.max() > np.iinfo(np.int32).max):
            raise ValueError(f"{self.prefix}: a sequence length is outside the int32 range of the .idx")
        tokens = cast_tokens(tokens, self.dtype, self.prefix)
        self._bin.write(memoryview(np.ascontiguousarray(tokens)).cast("B"))
        self._lengths.write(lengths.astype(np.int32).tobytes())
        self._docs.write((self.sequences + np.cumsum(per_doc)).astype(np.int64).tobytes())
        self.documents += per_doc.size
        self.sequences += lengths.size
        self.tokens += tokens.size

    def append_dataset(self, prefix: str) -> None:
        """Append a whole existing .bin/.idx pair (merging): streamed in blocks, constant memory.

        Raises ValueError naming the prefix for a dtype different from this writer's, and the
        errors of `open_index`.
        """
        index = open_index(prefix, "merge input")
        if index.dtype != self.dtype:
            raise ValueError(f"{prefix}: token dtype {np.dtype(index.dtype).name} differs from "
                             f"{np.dtype(self.dtype).name} of the datasets before it (different tokenizers?)")
        if index.sequence_modes is not None:
            raise ValueError(f"{prefix}: multimodal indexed datasets (sequence modes) cannot be merged")
        lengths, docs = index.sequence_lengths, index.document_indices
        tokens = int(lengths.sum(dtype=np.int64))
        with open(prefix + ".bin", "rb") as src:
            shutil.copyfileobj(src, self._bin, 16 << 20)
        for start in range(0, len(lengths), _BLOCK):
            self._lengths.write(np.asarray(lengths[start:start + _BLOCK], dtype=np.int32).tobytes())
        for start in range(1, len(docs), _BLOCK):
            self._docs.write((np.asarray(docs[start:start + _BLOCK], dtype=np.int64) + self.sequences).tobytes())
        self.documents += len(docs) - 1
        self.sequences += len(lengths)
        self.tokens += tokens

    def finalize(self) -> tuple[str, str]:
        """Write the .idx, then rename both files into place; returns (bin_path, idx_path)."""
        self._bin.flush()
        os.fsync(self._bin.fileno())
        for f in (self._bin, self._lengths, self._docs):
            f.close()
        itemsize = np.dtype(self.dtype).itemsize
        with open(self._tmp[".idx"], "wb") as idx:
            idx.write(INDEX_HEADER)
            idx.write(struct.pack("<Q", INDEX_VERSION))
            idx.write(struct.pack("<B", DTYPE_CODES[self.dtype]))
            idx.write(struct.pack("<Q", self.sequences))
            idx.write(struct.pack("<Q", self.documents + 1))
            with open(self._tmp[".lengths"], "rb") as src:
                shutil.copyfileobj(src, idx, 16 << 20)
            pointer = 0
            with open(self._tmp[".lengths"], "rb") as src:
                while True:
                    block = np.frombuffer(src.read(4 * _BLOCK), dtype=np.int32)
                    if not block.size:
                        break
                    ends = np.cumsum(block, dtype=np.int64) * itemsize + pointer
                    idx.write(np.concatenate(([pointer], ends[:-1])).astype(np.int64).tobytes())
                    pointer = int(ends[-1])
            idx.write(np.zeros(1, dtype=np.int64).tobytes())
            with open(self._tmp[".docs"], "rb") as src:
                shutil.copyfileobj(src, idx, 16 << 20)
            idx.flush()
            os.fsync(idx.fileno())
        for ext in (".lengths", ".docs"):
            os.remove(self._tmp[ext])
        os.replace(self._tmp[".bin"], self.prefix + ".bin")
        os.replace(self._tmp[".idx"], self.prefix + ".idx")
        return self.prefix + ".bin", self.prefix + ".idx"

    def abort(self) -> None:
        """Drop the temporary files (after an error)."""
        for f in (self._bin, self._lengths, self._docs):
            try:
                f.close()
            except Exception:  # noqa: BLE001 - best effort cleanup
                pass
        for path in self._tmp.values():
            if os.path.exists(path):
                os.remove(path)


# The name the foundation code and tests use.
AtomicIndexedWriter = IndexedWriter


def merge_datasets(prefixes: Sequence[str], output_prefix: str) -> IndexedWriter:
    """Concatenate indexed datasets (documents in the given order) into `output_prefix`.

    All inputs must have the same token dtype. Streams; the output appears only when complete.
    Returns the finalized writer (its documents/sequences/tokens counts).
    """
    if not prefixes:
        raise ValueError("nothing to merge")
    if os.path.abspath(output_prefix) in {os.path.abspath(p) for p in prefixes}:
        raise ValueError(f"--output-prefix {output_prefix} is also an input")
    indices = [open_index(p, f"merge input {i + 1}") for i, p in enumerate(prefixes)]  # all checked before writing
    writer = IndexedWriter(output_prefix, dtype=indices[0].dtype)
    try:
        for prefix in prefixes:
            writer.append_dataset(prefix)
        writer.finalize()
    except BaseException:
        writer.abort()
        raise
    return writer
