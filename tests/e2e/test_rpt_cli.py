"""`mrpt-rpt` as a user runs it: bad flags give one error listing every problem (exit 2), and a
malformed task file is named with its line."""

import os
import sys
from pathlib import Path

from tests.cli import run_python
from megatron_rpt.config.arguments import model_flags_argv
from megatron_rpt.config.presets import QWEN3_FAMILY

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
MODEL = [*model_flags_argv(QWEN3_FAMILY), "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4", "--num-query-groups", "4",
         "--seq-length", "64", "--tokenizer-type", "NullTokenizer", "--vocab-size", "255", "--lr", "1e-3",
         "--train-iters", "2"]


def rpt(*args):
    return run_python([sys.executable, "-m", "megatron_rpt.train_rpt", *MODEL, *args], env=ENV, timeout=300)


def test_bad_flags_are_all_reported(tmp_path):
    proc = rpt("--rpt-group-size", "1", "--rpt-temperature", "0", "--rpt-max-response-length", "64",
               "--grpo-kl-beta", "0.1", "--rollout-engine", "openai", "--global-batch-size", "7",
               "--rpt-eval-data", str(tmp_path / "missing.jsonl"), "--rpt-eval-max-tasks", "0")
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr
    for needed in ("--rpt-data is required", "--rpt-group-size must be >= 2", "--rpt-temperature must be > 0",
                   "--rpt-max-response-length 64 leaves no room for the prompt", "--grpo-kl-beta > 0 needs",
                   "--rollout-engine openai needs --rollout-url", "--global-batch-size 7 differs",
                   "missing.jsonl not found", "--rpt-eval-max-tasks must be >= 1"):
        assert needed in err, (needed, err)
    assert "Traceback" not in err


def test_malformed_task_file_is_named(tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"id": "a:1"}\n')
    proc = rpt("--rpt-data", str(tasks), "--rpt-contexts-per-step", "1", "--rpt-group-size", "2",
               "--rpt-max-response-length", "8")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{tasks}:1" in proc.stderr and "Traceback" not in proc.stderr


def test_task_file_of_the_wrong_kind_for_the_reward(tmp_path):
    """An RPT task file for --rl-reward math_answer stops the run at start-up with one error."""
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"id": "d:1", "doc_id": "d", "position": 1, "context": "a", "context_tokens": [1], '
                     '"target_tokens": [2], "target_bytes": ["62"], "entropy": 0.1, "splits": []}\n')
    proc = rpt("--rl-reward", "math_answer", "--rpt-data", str(tasks), "--rpt-contexts-per-step", "1",
               "--rpt-group-size", "2", "--rpt-max-response-length", "8")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert (f"--rpt-data {tasks}: holds RPT task files (tools/build_rpt_data.py), but --rl-reward math_answer "
            "reads RLVR problem files (tools/build_rl_data.py)") in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = rpt("--rl-reward", "nope")
    assert proc.returncode == 2 and "--rl-reward: invalid choice: 'nope'" in proc.stderr
