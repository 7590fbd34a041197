"""Writing Megatron indexed datasets (.bin/.idx) atomically.

`AtomicIndexedWriter` wraps Megatron-Core's `IndexedDatasetBuilder` so both files are written
under temporary names and renamed only after `finalize()`: an interrupted run never leaves a
truncated pair that looks valid, and readers see either the old pair or the new one.
"""

from __future__ import annotations

import os
from typing import Sequence

import warnings

import numpy as np

with warnings.catch_warnings():
    # Importing any megatron.core module runs its package __init__, which warns about missing
    # Apex/TE optimizers: irrelevant to writing files, and noise in every preprocess_data run.
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).* not installed", category=UserWarning)
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder


def token_dtype(vocab_size: int) -> type:
    """uint16 when every id fits (as Megatron-LM picks), else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


class AtomicIndexedWriter:
    """Append documents; `finalize()` publishes `{prefix}.bin` and `{prefix}.idx` together."""

    def __init__(self, prefix: str, vocab_size: int):
        self.prefix = prefix
        self._tmp_bin, self._tmp_idx = prefix + ".bin.tmp", prefix + ".idx.tmp"
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self.dtype = token_dtype(vocab_size)
        self._builder = IndexedDatasetBuilder(self._tmp_bin, dtype=self.dtype)
        self.documents = 0
        self.tokens = 0

    def add_document(self, ids: Sequence[int], sentence_lengths: Sequence[int] | None = None) -> None:
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"token id outside the {np.dtype(self.dtype).name} range of {self.prefix}")
        # The builder only calls numpy.array(x, dtype) on it: an int64 array avoids a per-document
        # torch tensor and numpy's __array__ deprecation warning.
        self._builder.add_document(arr, list(sentence_lengths) if sentence_lengths else [len(arr)])
        self.documents += 1
        self.tokens += len(ids)

    def finalize(self) -> tuple[str, str]:
        self._builder.finalize(self._tmp_idx)
        os.replace(self._tmp_bin, self.prefix + ".bin")
        os.replace(self._tmp_idx, self.prefix + ".idx")
        return self.prefix + ".bin", self.prefix + ".idx"

    def abort(self) -> None:
        """Drop the temporary files (after an error)."""
        try:
            self._builder.data_file.close()
        except Exception:  # noqa: BLE001 - best effort cleanup
            pass
        for path in (self._tmp_bin, self._tmp_idx):
            if os.path.exists(path):
                os.remove(path)
