"""examples/pipeline_study/run_study.py --small end to end (1 seed, CE only, 1-2 GRPO steps per stage), and
its numbers recomputed from the responses it recorded: the loop's pass@j (unbiased estimator, here with
math.comb in exact rationals), avg@k and cons@k of every evaluation, the table's and summary's copies of
them, each step's response length and its std, and the rewards themselves where a hand check applies.
The committed full-study results are checked the same way (no run: JSON only)."""

import json
import re
import statistics
import sys
from collections import Counter
from fractions import Fraction
from math import comb
from pathlib import Path

import pytest

from tests.cli import run_cli

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = "examples/pipeline_study/run_study.py"
COMMITTED = ROOT / "examples" / "pipeline_study" / "results"
BOX = re.compile(r"\\boxed\{([^{}\\]*)\}[^{}\\]*$")


def pass_at(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(comb(n - c, k), comb(n, k))


def boxed_after_think(text: str):
    """The content of the one `\\boxed{}` after the first `</think>` when that part of the text is that
    simple (one box, no other braces or backslashes after it), else None."""
    _, sep, region = text.partition("</think>")
    if not sep or region.count("\\boxed{") != 1:
        return None
    m = BOX.search(region)
    return m.group(1) if m else None


def check_stage(stage: dict, problems: dict) -> None:
    """Every evaluation and step of one RL stage against its recorded responses."""
    assert set(stage["evaluations"]) == set(stage["eval_responses"])
    for it, rows in stage["eval_responses"].items():
        m = stage["evaluations"][it]
        assert m["all/tasks"] == len(rows) == len(problems)
        k = len(rows[0]["rewards"])
        sums = Counter()
        for row in rows:
            rewards, answer = row["rewards"], problems[row["id"]]
            assert len(rewards) == len(row["texts"]) == k and row["answer"] == answer
            for text, r in zip(row["texts"], rewards):
                box = boxed_after_think(text)
                if "\\boxed{" not in text:
                    assert r == 0.0, text
                elif box is not None and box == answer:
                    assert r == 1.0, text
                elif box is not None and re.fullmatch(r"[0-9]", box):
                    assert r == 0.0, text       # another digit
            c = sum(r == 1.0 for r in rewards)
            for j in range(1, k + 1):
                sums[f"pass@{j}"] += pass_at(k, c, j)
            sums["avg"] += Fraction(sum(Fraction(r) for r in rewards), k)
            # cons@k: the loop votes on normalised answers; rows whose boxes are all single digits (or
            # absent) are recomputed here, the others bound the difference
            preds = [boxed_after_think(t) if "\\boxed{" in t else "" for t in row["texts"]]
            if all(p == "" or (p is not None and re.fullmatch(r"[0-9]", p)) for p in preds):
                votes = [(p, r) for p, r in zip(preds, rewards) if p]
                counts = Counter(p for p, _ in votes)
                sums["cons"] += next((r for p, r in votes if counts[p] == max(counts.values())), 0.0)
            else:
                sums["cons_unchecked"] += 1
        n = len(rows)
        for j in (1, 2, 4, 8, 16):
            if j <= k:
                assert m[f"all/pass@{j}"] == pytest.approx(float(sums[f"pass@{j}"] / n), abs=1e-12), (it, j)
        assert m[f"all/avg@{k}"] == pytest.approx(float(sums["avg"] / n), abs=1e-12)
        assert abs(m[f"all/cons@{k}"] - float(sums["cons"] / n)) <= sums["cons_unchecked"] / n + 1e-12
    assert sorted(stage["train_responses"], key=int) == [str(i) for i in range(1, stage["steps"] + 1)]
    for step, rec in stage["train_responses"].items():
        lengths = [n for group in rec["lengths"] for n in group]
        metrics = stage["metrics"][step]
        assert metrics["response_length"] == pytest.approx(statistics.fmean(lengths), abs=1e-9)
        assert metrics["response_length_std"] == pytest.approx(statistics.pstdev(lengths), abs=1e-6)
        assert 0 <= metrics["answer_rate"] <= 1 and metrics["entropy"] >= 0


def check_summary(results: Path, stages: dict) -> None:
    """summary.json and study.md carry the stages' own numbers (one seed: the value itself)."""
    summary = json.loads((results / "summary.json").read_text())
    table = (results / "study.md").read_text()
    for loss, by_when in summary["rlvr"].items():
        for when, by_seed in by_when.items():
            for seed, values in by_seed.items():
                stage = stages[f"rlvr_{loss}_s{seed}"]
                it = "0" if when == "before" else str(stage["steps"])
                for key in summary["keys"]:
                    assert values[key] == stage["evaluations"][it][f"all/{key}"]
                rows = stage["eval_responses"][it]
                for j, v in enumerate(values["pass_curve"], start=1):
                    exact = sum(pass_at(len(r["rewards"]), sum(x == 1.0 for x in r["rewards"]), j) for r in rows)
                    assert v == pytest.approx(float(exact / len(rows)), abs=1e-12)
            if len(by_seed) == 1:
                (values,) = by_seed.values()
                cells = " | ".join(f"{values[key]:.3f}" for key in summary["keys"])
                assert f"| {loss} | {when} RL | {cells} |" in table, (loss, when)


def _load(results: Path) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in (results / "stages").glob("*.json")}


def _problems(path: Path) -> dict:
    return {r["id"]: r["answer"] for r in map(json.loads, path.read_text().splitlines())}


def test_small_study_metrics_follow_from_its_responses(tmp_path):
    out, results = tmp_path / "run", tmp_path / "results"
    proc = run_cli(SCRIPT, "--small", "--output-dir", str(out), "--results-dir", str(results), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = _load(results)
    expected = {"pretrain_ce", "rlvr_ce_s1", "rpt_ce_s1", "rpt_rlvr_ce_s1", "rlp_ce_s1", "rlp_rlvr_ce_s1"}
    assert set(stages) == expected, sorted(stages)
    problems = _problems(out / "problems" / "chains_heldout.jsonl")
    for name in ("rlvr_ce_s1", "rpt_rlvr_ce_s1", "rlp_rlvr_ce_s1"):
        check_stage(stages[name], problems)
        # the loop's own record next to the checkpoints says the same
        lines = [json.loads(x) for x in (Path(stages[name]["checkpoint"]) / "rpt_eval.jsonl").read_text().splitlines()]
        assert {str(x.pop("iteration")): x for x in lines} == stages[name]["evaluations"]
    for first, reward in (("rpt", "prefix_match"), ("rlp", "information_gain")):
        assert stages[f"{first}_ce_s1"]["evaluations"] == {} and stages[f"{first}_ce_s1"]["reward"] == reward
        assert stages[f"{first}_rlvr_ce_s1"]["init"] == stages[f"{first}_ce_s1"]["checkpoint"]
        # RPT and RLP read the same corpus tasks with the same seed: the same contexts
        assert stages[f"{first}_ce_s1"]["argv"][stages[f"{first}_ce_s1"]["argv"].index("--rpt-data") + 1] \
            == str(out / "tasks" / "corpus_train.jsonl")
    # held-out problems are neither RL-train problems nor in the pretraining corpus
    train = {r["question"] for r in map(json.loads, (out / "problems" / "chains_train.jsonl").read_text().splitlines())}
    heldout = {r["question"] for r in map(json.loads, (out / "problems" / "chains_heldout.jsonl").read_text().splitlines())}
    corpus = (out / "corpus.jsonl").read_text()
    assert not train & heldout
    assert not any(re.search(rf'(^|"|Q:){re.escape(q)}=', corpus, re.M) for q in train | heldout)
    check_summary(results, stages)
    assert (results / "study.png").stat().st_size > 0
    # a second run finds every stage done and only redraws the report
    again = run_cli(SCRIPT, "--small", "--output-dir", str(out), "--results-dir", str(results), timeout=120)
    assert again.returncode == 0 and "mrpt-" not in again.stdout, again.stdout[-2000:]


@pytest.mark.parametrize("config", ["", "long", "long_p2", "long_p3", "full_main_corpus", "long_main_corpus"])
def test_committed_results_follow_from_their_responses(config):
    results = COMMITTED / config
    if not (results / "summary.json").exists():
        pytest.skip(f"no committed results in {results}")
    stages = _load(results)
    heldout = [s for s in stages.values() if s.get("evaluations")]
    assert heldout
    answers = {r["id"]: r["answer"] for s in heldout for rows in s["eval_responses"].values() for r in rows}
    for stage in heldout:
        check_stage(stage, answers)
    check_summary(results, stages)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
