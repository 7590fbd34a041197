"""Checks of .bin/.idx prefixes before Megatron-Core builds datasets from them.

Megatron-Core fails late and obscurely on bad data: an assertion deep in the reader for a missing
or foreign .idx, silent garbage for a truncated .bin, an endless loop in `GPTDataset` for a split
that holds no documents, and a CUDA index error (or silently wrong training on CPU) for token ids
beyond the tokenizer's vocabulary. Each check here returns one message per problem, naming
the flag and position (`where`), the file, and what to do; callers gather them into one
`ConfigError`. The .idx header is read with Megatron-Core's own `_IndexReader`. `check_data_config`
is the data part of a run's configuration check (`megatron_rpt.validate`): flags and files.

Cost: `check_prefix` and `check_split_documents` read the .idx header and O(1) entries of it;
`check_token_ids` reads a bounded sample of the .bin (`sample_tokens` per prefix, spread over
`windows` windows that include the first and the last tokens), never the whole file.
"""

from __future__ import annotations

import os
import struct
from typing import Optional, Sequence

import numpy as np

from megatron_rpt.data.blend import data_blends, parse_blend, parse_split, prefix_position

# Tokens scanned per prefix by check_token_ids: 8 windows of 1 Mi tokens (16 MiB of uint16).
SAMPLE_TOKENS = 8 * 2 ** 20
SAMPLE_WINDOWS = 8
SPLIT_NAMES = ("train", "validation", "test")
_REMEDY = "recreate the pair with tools/preprocess_data.py"


class _Index:
    """What the checks need from one prefix's .idx (read by Megatron-Core's `_IndexReader`)."""

    def __init__(self, prefix: str):
        from megatron.core.datasets.indexed_dataset import _IndexReader
        reader = _IndexReader(prefix + ".idx", False)
        self.dtype = np.dtype(reader.dtype)
        self.sequences = len(reader)
        self.documents = max(len(reader.document_indices) - 1, 0)
        # Pointers are byte offsets of each sequence in the .bin, written contiguously from 0.
        self.pointers = np.asarray(reader.sequence_pointers)
        self.lengths = np.asarray(reader.sequence_lengths)
        self.document_indices = np.asarray(reader.document_indices)
        self.bin_bytes = (int(self.pointers[-1]) + int(self.lengths[-1]) * self.dtype.itemsize
                          if self.sequences else 0)
        self.tokens = self.bin_bytes // self.dtype.itemsize
        self._reader = reader  # keeps the .idx memory map the arrays above view alive

    def tokens_in(self, begin: int, end: int) -> int:
        """Tokens of sequences [begin, end), from two pointers (no pass over the lengths)."""
        if end <= begin:
            return 0
        last = int(self.pointers[end - 1]) + int(self.lengths[end - 1]) * self.dtype.itemsize
        return (last - int(self.pointers[begin])) // self.dtype.itemsize

    def document_of(self, token: int) -> int:
        """The document holding the token at position `token` of the .bin."""
        sequence = int(np.searchsorted(self.pointers, token * self.dtype.itemsize, side="right")) - 1
        return int(np.searchsorted(self.document_indices, sequence, side="right")) - 1


def _open(prefix: str, where: str) -> tuple[Optional[_Index], list[str]]:
    missing = [prefix + ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
    if missing:
        return None, [f"{where}: {' and '.join(missing)} not found (run tools/preprocess_data.py "
                      "to create it)"]
    try:
        index = _Index(prefix)
    except (AssertionError, ValueError, IndexError, struct.error, OSError) as e:
        # A wrong header or version (assertion), or an .idx shorter than its header says.
        return None, [f"{where}: {prefix}.idx is not a readable Megatron index file "
                      f"({type(e).__name__}: {e}); {_REMEDY}"]
    return index, []


def check_prefix(prefix: str, where: str, allow_empty: bool = False) -> list[str]:
    """Both files exist, the .idx is readable, the .bin has exactly the bytes the .idx describes,
    and (unless `allow_empty`) the prefix holds tokens."""
    index, problems = _open(prefix, where)
    if index is None:
        return problems
    size = os.path.getsize(prefix + ".bin")
    if size != index.bin_bytes:
        what = ("is truncated" if size < index.bin_bytes
                else "is longer than its index (the two files come from different runs)")
        return [f"{where}: {prefix}.bin has {size} bytes but {prefix}.idx describes {index.bin_bytes} "
                f"({index.tokens} {index.dtype.name} tokens in {index.documents} documents): the .bin "
                f"{what}; {_REMEDY}"]
    if index.tokens == 0 and not allow_empty:
        return [f"{where}: {prefix} holds no tokens ({index.documents} documents); {_REMEDY} "
                "from a non-empty input or drop it from the blend"]
    return []


def check_split_documents(prefix: str, where: str, split: str, label: Optional[str] = None) -> list[str]:
    """Every split that `split` (e.g. "969,30,1") gives a share must get tokens of this prefix;
    `label` is how messages name the setting (default "--split SPLIT").

    Megatron-Core cuts each prefix at round(share x sequences) and builds every split with a
    share; a share that rounds to no tokens makes `GPTDataset` loop forever counting epochs.
    """
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)
    index, problems = _open(prefix, where)
    if index is None:
        return problems
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    out = []
    for name, bounds in zip(SPLIT_NAMES, matrix):
        if bounds is None:
            continue
        # The same arithmetic as BlendedMegatronDatasetBuilder._build_megatron_dataset_splits.
        begin = int(round(bounds[0] * float(index.sequences)))
        end = int(round(bounds[1] * float(index.sequences)))
        if index.tokens_in(begin, end) == 0:
            out.append(f"{where}: {label or '--split ' + split} gives the {name} split {bounds[1] - bounds[0]:.3g} "
                       f"of {prefix}'s {index.sequences} documents, which rounds to none (Megatron-Core "
                       f"would loop forever building it); give the {name} split a larger share or 0, "
                       "or use more data")
    return out


def sample_windows(n: int, sample_tokens: int = SAMPLE_TOKENS, windows: int = SAMPLE_WINDOWS
                   ) -> list[tuple[int, int]]:
    """[start, stop) token ranges to scan: all of a small file, else `windows` equal windows
    spread evenly from the first token to the last."""
    if n <= sample_tokens:
        return [(0, n)] if n else []
    width = max(sample_tokens // windows, 1)
    starts = np.linspace(0, n - width, windows).astype(np.int64)
    return [(int(s), int(s) + width) for s in starts]


def check_token_ids(prefix: str, where: str, vocab_size: int, *, sample_tokens: int = SAMPLE_TOKENS,
                    windows: int = SAMPLE_WINDOWS) -> list[str]:
    """Every sampled token id is in [0, vocab_size), the tokenizer's own (unpadded) vocabulary.

    A bounded sample (see `sample_windows`) rather than the whole file: a prefix is written by
    one tokenizer, so a wrong tokenizer shows in any large sample, and a terabyte is not read.
    """
    index, problems = _open(prefix, where)
    if index is None:
        return problems
    n = min(index.tokens, os.path.getsize(prefix + ".bin") // index.dtype.itemsize)
    if n == 0:
        return []
    data = np.memmap(prefix + ".bin", dtype=index.dtype, mode="r", shape=(n,))
    # The largest id >= vocab_size (else the smallest < 0, possible in int32 data) and where it is.
    scanned, worst, worst_at = 0, None, -1
    for start, stop in sample_windows(n, sample_tokens, windows):
        chunk = np.asarray(data[start:stop])
        scanned += len(chunk)
        hi, lo = int(chunk.max()), int(chunk.min())
        if hi >= vocab_size and (worst is None or worst < 0 or hi > worst):
            worst, worst_at = hi, start + int(np.argmax(chunk == hi))
        elif lo < 0 and worst is None:
            worst, worst_at = lo, start + int(np.argmax(chunk == lo))
    del data
    if worst is None:
        return []
    return [f"{where}: {prefix}.bin holds token id {worst} (token {worst_at}, document "
            f"{index.document_of(worst_at)}) but the tokenizer's vocabulary size is {vocab_size} "
            f"(ids 0..{vocab_size - 1}): the data was tokenized with another tokenizer; pass the one "
            "it was preprocessed with (--tokenizer-type/--tokenizer-model, or --vocab-size for "
            f"NullTokenizer) or re-run tools/preprocess_data.py (scanned {scanned} of {n} tokens)"]


def check_token_ids_all(prefixes: Sequence[tuple[str, str]], vocab_size: int, **kwargs) -> list[str]:
    """`check_token_ids` for (where, prefix) pairs, each distinct prefix scanned once."""
    seen, out = set(), []
    for where, prefix in prefixes:
        if prefix not in seen:
            seen.add(prefix)
            out.extend(check_token_ids(prefix, where, vocab_size, **kwargs))
    return out


def check_data_config(cfg, check_files: bool, pretraining_data: bool = True) -> list[str]:
    """The data flags of a run (`RunConfig`): blends, --split, validation data, tokenizer flags, and with
    `check_files` the prefixes, the split shares and the tokenizer files on disk. One message per problem."""
    d, t = cfg.data, cfg.training
    problems = []
    blends = data_blends(d) if pretraining_data else []
    per_split = [flag for flag, _ in blends if flag != "--data-path"]
    if d.data_path and per_split:
        problems.append(f"--data-path and {'/'.join(per_split)} are mutually exclusive: give one blend "
                        "divided by --split, or one blend per split")
    elif not d.mock_data and not blends and pretraining_data:
        problems.append("--data-path is required (or --train-data-path [--valid-data-path "
                        "--test-data-path], or --mock-data)")
    elif not d.mock_data and per_split and not d.train_data_path:
        problems.append(f"{'/'.join(per_split)} without --train-data-path: give the training blend too")
    parsed = []
    for flag, items in blends:
        try:
            parsed.append((flag, parse_blend(items, flag)[0]))
        except ValueError as e:
            problems.append(str(e))
    split, shares = None, None
    if not per_split:  # Megatron-LM ignores --split when each split has its own blend
        try:
            shares = parse_split(d.split)
            split = ",".join(str(x) for x in shares)
        except ValueError as e:
            problems.append(str(e))
    if pretraining_data and t.eval_interval > 0 and t.eval_iters > 0 and not d.mock_data:
        asks = f"--eval-interval {t.eval_interval} with --eval-iters {t.eval_iters} asks for validation"
        if per_split and not d.valid_data_path and not d.data_path:
            problems.append(f"{asks}, but there is no --valid-data-path; give one or set --eval-interval 0")
        elif d.data_path and shares is not None and shares[1] == 0:
            problems.append(f"{asks}, but --split {d.split} gives the validation split no data; give it "
                            "a share (e.g. --split 969,30,1) or set --eval-interval 0")
    if check_files and not d.mock_data:
        for flag, prefixes in parsed:
            for i, prefix in enumerate(prefixes):
                where = prefix_position(flag, i, len(prefixes))
                found = check_prefix(prefix, where)
                problems.extend(found)
                if not found and flag == "--data-path" and split is not None:
                    problems.extend(check_split_documents(prefix, where, split, f"--split {d.split}"))
        if d.data_cache_path is not None:
            problems.extend(_writable_dir_problems(d.data_cache_path, "--data-cache-path"))
    if d.tokenizer_type is None and not d.mock_data:
        # Megatron-LM's GPT-3 175B example gives the GPT-2 files without a type (and fails the same way)
        hint = " (--vocab-file and --merge-file: --tokenizer-type GPT2BPETokenizer)" if d.vocab_file and d.merge_file else ""
        problems.append(f"--tokenizer-type is required{hint}")
    if d.tokenizer_type is None and d.mock_data and cfg.model.vocab_size is None:
        problems.append("--mock-data without --tokenizer-type needs --vocab-size")
    if d.tokenizer_type in ("SentencePieceTokenizer", "Llama2Tokenizer", "HuggingFaceTokenizer", "TikTokenizer") and \
            d.tokenizer_model is None:
        problems.append(f"--tokenizer-type {d.tokenizer_type} needs --tokenizer-model")
    if d.tokenizer_type == "GPT2BPETokenizer" and (d.vocab_file is None or d.merge_file is None):
        problems.append("--tokenizer-type GPT2BPETokenizer needs --vocab-file and --merge-file")
    if d.tokenizer_type == "NullTokenizer" and cfg.model.vocab_size is None:
        problems.append("--tokenizer-type NullTokenizer needs --vocab-size")
    if check_files:
        for flag, path in (("--tokenizer-model", d.tokenizer_model), ("--vocab-file", d.vocab_file),
                           ("--merge-file", d.merge_file)):
            if path is not None and not os.path.exists(path):
                problems.append(f"{flag}: {path} not found")
    return problems


def _writable_dir_problems(path: str, flag: str) -> list[str]:
    """`path` is (or can be created as) a folder this process may write to."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            return [f"{flag}: {path} exists and is not a folder"]
        return [] if os.access(path, os.W_OK | os.X_OK) else [f"{flag}: {path} is not writable"]
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        return [f"{flag}: cannot create {path} ({parent} is not a writable folder)"]
    return []
