"""RLVR problem files from their sources (tools/build_rl_data.py): reasoning-gym's procedural datasets
and the CHAMP competition problems, written as PREFIX_train.jsonl / PREFIX_heldout.jsonl /
PREFIX.meta.json (`problems.FORMAT`), each under a temporary name and renamed when complete.

reasoning-gym (`--dataset NAME`, config as JSON): item i of a dataset with seed s is drawn from
`Random(s + i)`, so train is drawn with seed s and held-out with s + 2^31 (mod 2^32): the two never
share a random stream for fewer than 2^31 problems. Questions are deduplicated within train, and
held-out against itself and train (further items are drawn to make up the counts, at most
`DRAW_FACTOR` x the count, then it is an error: the dataset's config has too few distinct problems).
Answers are reasoning-gym's strings; the family is "math" (the datasets this tool is meant for are
arithmetic and word problems); the solution is the dataset's worked one where it has one
(gsm_symbolic's `answer_cot`).

CHAMP (270 problems, `demo_assets.corpus.champ_problems` reads the package): many reference answers
are prose ("No such values", "x(n)>y(n-1) for all n≥2"), which no answer checker can verify.
A problem is kept when its answer, less a trailing "(i.e., ...)" remark, is short (`CHAMP_MAX_ANSWER`
characters) and holds no word (no run of two ASCII letters): numbers and formulas like "n!",
"(x^2+x+1)(x^2-x+1)", "x=±1, ±2, ±1/2". 140 of the 270 are kept (yes/no answers are skipped too: a
coin flip would earn half their reward). The category is the problem's split; held-out problems are
a seeded choice of `heldout` of them.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Iterable, Optional

from megatron_rpt.fileio import atomic_open, write_json
from megatron_rpt.rpt.tasks.format import TaskError
from megatron_rpt.rpt.tasks.problems import FORMAT, Problem

DRAW_FACTOR = 4
CHAMP_MAX_ANSWER = 60
_HELDOUT_OFFSET = 2 ** 31
_REMARK = re.compile(r"\s*\(i\.e\.,.*\)\s*$")
_WORD = re.compile(r"[A-Za-z]{2,}")


def _reasoning_gym_items(dataset: str, config: dict, seed: int, size: int):
    try:
        import reasoning_gym
    except ImportError:
        raise TaskError("--dataset needs the reasoning-gym package (pip install 'megatron-rpt[rl]')") from None
    if {"seed", "size"} & set(config):
        raise TaskError("--dataset-config: seed and size are set by --seed and the problem counts")
    try:
        return reasoning_gym.create_dataset(dataset, seed=seed, size=size, **config)
    except (ValueError, TypeError, AssertionError) as e:
        raise TaskError(f"--dataset {dataset} --dataset-config {json.dumps(config)}: {e}") from None


def _draw(dataset: str, config: dict, seed: int, count: int, seen: set, split: str) -> list[Problem]:
    """`count` problems with questions not in `seen` (which grows), items 0, 1, ... of the seed's dataset."""
    limit = DRAW_FACTOR * count + 16
    items = _reasoning_gym_items(dataset, config, seed, limit)
    out = []
    for i in range(limit):
        if len(out) == count:
            break
        item = items[i]
        question, answer = item["question"], str(item["answer"])
        if question in seen or not question.strip() or not answer.strip():
            continue
        seen.add(question)
        cot = item.get("metadata", {}).get("answer_cot")
        out.append(Problem(id=f"{dataset}/{split}/{i}", family="math", source=f"reasoning_gym/{dataset}",
                           question=question, answer=answer, solution=cot if isinstance(cot, str) else None,
                           splits=[]))
    if len(out) < count:
        raise TaskError(f"--dataset {dataset}: only {len(out)} distinct {split} questions in {limit} draws "
                        f"(wanted {count}); ask for fewer or widen --dataset-config")
    return out


def reasoning_gym_problems(dataset: str, config: dict, train: int, heldout: int,
                           seed: int) -> tuple[list[Problem], list[Problem]]:
    """(train, held-out) problems of a reasoning-gym dataset (see the module docstring)."""
    seen: set = set()
    train_set = _draw(dataset, config, seed % 2 ** 32, train, seen, "train")
    heldout_set = _draw(dataset, config, (seed + _HELDOUT_OFFSET) % 2 ** 32, heldout, seen, "heldout")
    return train_set, heldout_set


def champ_final_answer(answer: str) -> Optional[str]:
    """A CHAMP answer as a short final answer, or None when it is prose (see the module docstring)."""
    short = _REMARK.sub("", answer.strip())
    if not short or len(short) > CHAMP_MAX_ANSWER or _WORD.search(short):
        return None
    return short


def champ_problem_set(records: Iterable[dict], heldout: int, seed: int) -> tuple[list[Problem], list[Problem], int]:
    """(train, held-out, skipped) from `demo_assets.corpus.champ_problems()` records
    ({"id", "category", "problem", "steps", "answer"}): problems without a short final answer are
    skipped; `heldout` of the rest, a seeded choice, are held out."""
    kept, skipped = [], 0
    for r in records:
        answer = champ_final_answer(r["answer"])
        if answer is None:
            skipped += 1
            continue
        kept.append(Problem(id=f"champ/{r['id']}", family="math", source="champ", question=r["problem"],
                            answer=answer, solution="\n".join(r["steps"]) or None,
                            splits=[r["category"].lower()]))
    if not 0 <= heldout < len(kept):
        raise TaskError(f"--heldout-size {heldout}: CHAMP has {len(kept)} problems with a short final answer")
    chosen = set(random.Random(seed).sample(range(len(kept)), heldout))
    return ([p for i, p in enumerate(kept) if i not in chosen], [p for i, p in enumerate(kept) if i in chosen],
            skipped)


def write_problem_files(prefix: str, train: list[Problem], heldout: list[Problem], meta: dict) -> dict:
    """PREFIX_train.jsonl, PREFIX_heldout.jsonl and PREFIX.meta.json (written last: its presence says the
    set is complete), each atomically; returns the meta record."""
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    for split, problems in (("train", train), ("heldout", heldout)):
        with atomic_open(f"{prefix}_{split}.jsonl") as f:
            f.writelines(p.to_json() + "\n" for p in problems)
    meta = {"format": FORMAT, "train": len(train), "heldout": len(heldout), **meta}
    write_json(f"{prefix}.meta.json", meta)
    return meta
