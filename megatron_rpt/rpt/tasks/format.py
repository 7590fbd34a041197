"""The RPT task file format: `Task` records (one per line of PREFIX_{train,heldout}.jsonl), their
validation (`_check_record`), the reader (`load_tasks`), the difficulty splits and `TaskError`.

Difficulty splits are the paper's nested sets entropy > 0.5 / 1.0 / 1.5 = easy / medium / hard
(arXiv 2506.08007). `FORMAT` names this format in PREFIX.meta.json.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

from megatron_rpt.data.jsonl import iter_lines, parse_line

SPLITS: tuple[tuple[str, float], ...] = (("easy", 0.5), ("medium", 1.0), ("hard", 1.5))
FORMAT = "mrpt-rpt-tasks/1"
_RECORD_KEYS = ("id", "doc_id", "position", "context", "context_tokens", "target_tokens", "target_bytes", "entropy",
                "splits")


class TaskError(ValueError):
    """Bad input, configuration or task file; the message names the file:line or flag."""


@dataclass(frozen=True)
class Task:
    """One next-token-reasoning task (one line of PREFIX_{train,heldout}.jsonl)."""

    id: str                      # "<doc_id>:<position>"
    doc_id: str
    position: int                # index of the first target token in the document's tokens
    context: str                 # UTF-8 decode of the bytes of tokens[:position]
    context_tokens: list[int]    # tokens[:position]
    target_tokens: list[int]     # tokens[position:position + target_tokens]
    target_bytes: list[str]      # hex of each target token's bytes
    entropy: float               # proxy's top-16 renormalised entropy at position (nats)
    splits: list[str]            # difficulty splits it belongs to ("easy" ⊇ "medium" ⊇ "hard")

    @property
    def prompt_content(self) -> str:
        """What fills the prompt template's {context}: the context text."""
        return self.context

    @property
    def target_token_bytes(self) -> list[bytes]:
        """The target tokens' bytes, what `rpt.reward.prefix_match_reward` takes."""
        return [bytes.fromhex(h) for h in self.target_bytes]

    def to_json(self) -> str:
        return json.dumps({k: getattr(self, k) for k in _RECORD_KEYS}, ensure_ascii=False)


def splits_for(entropy: float) -> list[str]:
    """The paper's nested difficulty splits an entropy belongs to."""
    return [name for name, threshold in SPLITS if entropy > threshold]


def _is_int_list(x) -> bool:
    return isinstance(x, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in x)


def check_keys(obj, keys: tuple) -> dict:
    """`obj` when it is a JSON object with exactly `keys`; ValueError naming what is missing or extra."""
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise ValueError(f"missing key(s) {', '.join(missing)}")
    extra = sorted(set(obj) - set(keys))
    if extra:
        raise ValueError(f"unknown key(s) {', '.join(extra)}")
    return obj


def _check_record(obj) -> Task:
    """A Task from one decoded record; ValueError with what is wrong."""
    check_keys(obj, _RECORD_KEYS)
    if not isinstance(obj["doc_id"], str) or not obj["doc_id"]:
        raise ValueError("doc_id must be a non-empty string")
    pos = obj["position"]
    if not isinstance(pos, int) or isinstance(pos, bool) or pos < 1:
        raise ValueError("position must be an integer >= 1")
    if obj["id"] != f"{obj['doc_id']}:{pos}":
        raise ValueError(f"id {obj['id']!r} is not '<doc_id>:<position>' ({obj['doc_id']}:{pos})")
    if not isinstance(obj["context"], str):
        raise ValueError("context must be a string")
    if not _is_int_list(obj["context_tokens"]) or len(obj["context_tokens"]) != pos:
        raise ValueError("context_tokens must be a list of `position` non-negative integers")
    if not _is_int_list(obj["target_tokens"]) or not obj["target_tokens"]:
        raise ValueError("target_tokens must be a non-empty list of non-negative integers")
    hexes = obj["target_bytes"]
    if not isinstance(hexes, list) or len(hexes) != len(obj["target_tokens"]):
        raise ValueError("target_bytes must be a list with one hex string per target token")
    for h in hexes:
        if not isinstance(h, str):
            raise ValueError("target_bytes entries must be hex strings")
        try:
            bytes.fromhex(h)
        except ValueError:
            raise ValueError(f"target_bytes entry {h!r} is not hex") from None
    e = obj["entropy"]
    if not isinstance(e, (int, float)) or isinstance(e, bool) or not math.isfinite(e) or e < 0:
        raise ValueError("entropy must be a finite non-negative number")
    if obj["splits"] != splits_for(float(e)):
        raise ValueError(f"splits {obj['splits']!r} disagree with entropy {e} (expected {splits_for(float(e))!r})")
    return Task(obj["id"], obj["doc_id"], pos, obj["context"], list(obj["context_tokens"]), list(obj["target_tokens"]),
                list(hexes), float(e), list(obj["splits"]))


def load_tasks(path: str | os.PathLike) -> list[Task]:
    """Every task of a PREFIX_{train,heldout}.jsonl file, each record validated; a malformed one is
    one TaskError naming file:line (blank lines are skipped; lines as `data.jsonl` reads them)."""
    tasks = []
    for lineno, raw in iter_lines(os.fspath(path)):
        try:
            obj = parse_line(raw)
        except ValueError as e:
            raise TaskError(f"{path}:{lineno}: {e}") from None
        try:
            tasks.append(_check_record(obj))
        except ValueError as e:
            raise TaskError(f"{path}:{lineno}: malformed task record: {e}") from None
    return tasks
