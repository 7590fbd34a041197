"""Megatron-LM's data-blend flags: `--data-path` / `--train|valid|test-data-path` blends and `--split`.

`parse_blend` turns a blend list into (prefixes, weights) as Megatron-Core's builders take it;
`data_prefixes` lists every prefix of every blend given with the position messages use for it.
Errors are `ValueError`s naming the flag and the item; the configuration check
(`data.validate.check_data_config`) gathers them into one `ConfigError`.
"""

from __future__ import annotations

import math
from typing import Optional

from megatron_rpt.config.schema import DataConfig


def _number(item: str) -> Optional[float]:
    try:
        return float(item)
    except ValueError:
        return None


def parse_blend(data_path: list, flag: str = "--data-path") -> tuple[list[str], Optional[list[float]]]:
    """A Megatron-LM blend list -> (prefixes, weights or None); ValueError names the flag and item.

    'A' or 'A B ...' (no weights: Megatron-Core weighs each prefix by its size) or
    'W1 A W2 B ...' (weights > 0, normalised by Megatron-Core).
    """
    items = [str(x).strip() for x in data_path]
    if not items:
        raise ValueError(f"{flag}: no prefix given")
    numbers = [_number(x) for x in items]
    if all(x is None for x in numbers):
        return items, None
    if len(items) % 2:
        raise ValueError(f"{flag}: {len(items)} items, with numbers among them: expected weight/prefix "
                         "pairs 'W1 PREFIX1 W2 PREFIX2 ...' (or prefixes only)")
    weights, prefixes = [], []
    for i in range(0, len(items), 2):
        weight, prefix = numbers[i], items[i + 1]
        if weight is None:
            raise ValueError(f"{flag}: item {i + 1} {items[i]!r} is not a weight "
                             "(expected 'W1 PREFIX1 W2 PREFIX2 ...')")
        if numbers[i + 1] is not None:
            raise ValueError(f"{flag}: item {i + 2} {prefix!r} is a number where a prefix is expected "
                             "(expected 'W1 PREFIX1 W2 PREFIX2 ...')")
        if not math.isfinite(weight):
            raise ValueError(f"{flag}: weight {items[i]} for {prefix} is not a finite number")
        if weight < 0:
            raise ValueError(f"{flag}: negative weight {weight} for {prefix}")
        if weight == 0:
            raise ValueError(f"{flag}: zero weight for {prefix} (Megatron-Core cannot blend it); "
                             "drop the prefix instead")
        weights.append(weight)
        prefixes.append(prefix)
    return prefixes, weights


PER_SPLIT_FLAGS = ("--train-data-path", "--valid-data-path", "--test-data-path")


def data_blends(d: DataConfig) -> list[tuple[str, list]]:
    """The blends given, as (flag, items): --data-path and/or the per-split flags, in that order."""
    given = [("--data-path", d.data_path)] + list(zip(PER_SPLIT_FLAGS, (d.train_data_path, d.valid_data_path,
                                                                        d.test_data_path)))
    return [(flag, items) for flag, items in given if items]


def prefix_position(flag: str, i: int, n: int) -> str:
    """How messages name a prefix: its flag, and its position when the blend has several."""
    return flag if n == 1 else f"{flag} prefix {i + 1} of {n}"


def data_prefixes(d: DataConfig) -> list[tuple[str, str]]:
    """(position, prefix) of every prefix of every blend given (ValueError for a bad blend)."""
    out = []
    for flag, items in data_blends(d):
        prefixes, _ = parse_blend(items, flag)
        out.extend((prefix_position(flag, i, len(prefixes)), p) for i, p in enumerate(prefixes))
    return out


def parse_split(split: str) -> list[float]:
    try:
        parts = [float(x) for x in split.replace("/", ",").split(",")]
    except ValueError:
        raise ValueError(f"--split: {split!r} is not a comma-separated list of numbers") from None
    if not 1 <= len(parts) <= 3 or any(x < 0 for x in parts) or sum(parts) <= 0:
        raise ValueError(f"--split: {split!r} must be 1-3 non-negative numbers with a positive sum")
    return parts + [0.0] * (3 - len(parts))
