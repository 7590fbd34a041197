"""The RLVR problem file format: `Problem` records (one per line of PREFIX_{train,heldout}.jsonl, written
by tools/build_rl_data.py), their validation, the reader (`load_problems`), and `task_file_kind`,
which tells a problem file from an RPT task file (`format.py`) by its first record.

A record is `{"id", "family", "source", "question", "answer", "solution", "splits"}`: the family names
the kind of problem (and the prompt template made for it, e.g. "math"), the source where it comes
from ("reasoning_gym/chain_sum", "champ"), the answer is the reference final answer as a string (what
`rpt.answers` compares the boxed answer with), the solution a worked solution or null, and the splits
the evaluation subsets the problem belongs to (e.g. a CHAMP category) besides "all".
`FORMAT` names this format in PREFIX.meta.json.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

from megatron_rpt.data.jsonl import iter_lines, parse_line
from megatron_rpt.rpt.tasks.format import TaskError, check_keys

FORMAT = "mrpt-rl-problems/1"
_RECORD_KEYS = ("id", "family", "source", "question", "answer", "solution", "splits")


@dataclass(frozen=True)
class Problem:
    """One problem with a verifiable final answer (one line of PREFIX_{train,heldout}.jsonl)."""

    id: str
    family: str                  # e.g. "math"
    source: str                  # e.g. "reasoning_gym/chain_sum", "champ"
    question: str
    answer: str                  # the reference final answer
    solution: Optional[str]      # a worked solution, when the source has one
    splits: list[str]            # evaluation subsets besides "all"

    @property
    def prompt_content(self) -> str:
        """What fills the prompt template's {context}: the question."""
        return self.question

    def to_json(self) -> str:
        return json.dumps({k: getattr(self, k) for k in _RECORD_KEYS}, ensure_ascii=False)


def _check_record(obj) -> Problem:
    """A Problem from one decoded record; ValueError with what is wrong."""
    check_keys(obj, _RECORD_KEYS)
    for key in ("id", "family", "source", "question", "answer"):
        if not isinstance(obj[key], str) or not obj[key].strip():
            raise ValueError(f"{key} must be a non-empty string")
    if obj["solution"] is not None and not isinstance(obj["solution"], str):
        raise ValueError("solution must be a string or null")
    splits = obj["splits"]
    if not isinstance(splits, list) or not all(isinstance(s, str) and s for s in splits):
        raise ValueError("splits must be a list of non-empty strings")
    if "all" in splits or len(set(splits)) != len(splits):
        raise ValueError(f"splits {splits!r}: 'all' is implied, and each split is named once")
    return Problem(obj["id"], obj["family"], obj["source"], obj["question"], obj["answer"], obj["solution"],
                   list(splits))


def load_problems(path: str | os.PathLike) -> list[Problem]:
    """Every problem of a PREFIX_{train,heldout}.jsonl file, each record validated; a malformed one or
    a repeated id is one TaskError naming file:line (blank lines are skipped)."""
    problems, seen = [], {}
    for lineno, raw in iter_lines(os.fspath(path)):
        try:
            problem = _check_record(parse_line(raw))
        except ValueError as e:
            raise TaskError(f"{path}:{lineno}: malformed problem record: {e}") from None
        if problem.id in seen:
            raise TaskError(f"{path}:{lineno}: problem id {problem.id!r} already on line {seen[problem.id]}")
        seen[problem.id] = lineno
        problems.append(problem)
    return problems


def task_file_kind(path: str | os.PathLike) -> Optional[str]:
    """"problem" (this format), "corpus" (RPT tasks, `format.py`) or None (empty, or neither: the
    reader of the expected kind then names what is wrong), from the file's first record."""
    for _, raw in iter_lines(os.fspath(path)):
        try:
            obj = parse_line(raw)
        except ValueError:
            return None
        if isinstance(obj, dict) and "question" in obj:
            return "problem"
        if isinstance(obj, dict) and "context_tokens" in obj:
            return "corpus"
        return None
    return None
