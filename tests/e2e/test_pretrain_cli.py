"""The user's path through the command line: tools -> torchrun mrpt-pretrain -> resume; CLI errors."""

import json
import os
import re
import sys
from pathlib import Path

import pytest

from tests.cli import run_python

ROOT = Path(__file__).resolve().parents[2]
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be "
        "in want of a wife. However little known the feelings or views of such a man may be on his first "
        "entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families. ")


def sh(*args, check=True, env=None):
    proc = run_python(args, env={**os.environ, **(env or {})})   # forked, not a fresh interpreter (tests/cli.py)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e")
    with open(d / "corpus.jsonl", "w") as f:
        for i in range(200):
            f.write(json.dumps({"text": f"Chapter {i}. " + TEXT * (1 + i % 5)}) + "\n")
    sh(sys.executable, "tools/train_tokenizer.py", "--input", d / "corpus.jsonl", "--vocab-size", "400",
       "--output-prefix", d / "spm")
    sh(sys.executable, "tools/preprocess_data.py", "--input", d / "corpus.jsonl", "--tokenizer-type",
       "SentencePieceTokenizer", "--tokenizer-model", d / "spm.model", "--append-eod", "--workers", "2",
       "--output-prefix", d / "corpus", "--no-progress")
    return d


def train_args(d, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "megatron_rpt.pretrain", "--model-preset", "tiny", "--num-layers", "2", "--seq-length", "64",
            "--tensor-model-parallel-size", "2", "--micro-batch-size", "4", "--global-batch-size", "8",
            "--lr", "3e-3", "--train-iters", "20", "--lr-warmup-iters", "2", "--data-path", d / "corpus_text_document",
            "--split", "90,10,0", "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", d / "spm.model",
            "--log-interval", "5", "--eval-interval", "10", "--eval-iters", "2", "--save", d / "ckpt",
            "--load", d / "ckpt", "--save-interval", "10", "--tensorboard-dir", d / "tb", *extra]


def losses(stdout):
    return {int(m.group(1)): float(m.group(2))
            for m in re.finditer(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.E+-]+)", stdout)}


def test_torchrun_train_interrupt_resume(data):
    first = sh(*train_args(data, "--exit-interval", "10")).stdout
    assert "training stopped at iteration 10 (exit_interval)" in first
    second = sh(*train_args(data)).stdout
    assert "resumed from" in second and "iter_0000010" in second
    l1, l2 = losses(first), losses(second)
    assert sorted(l1) == [5, 10] and sorted(l2) == [15, 20]
    assert l2[20] < l1[5]
    assert (data / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "20"
    assert "validation loss at iteration 20" in second
    assert list((data / "tb").glob("events.out.tfevents.*"))


def test_cli_config_error_exits_2_with_every_problem(data):
    proc = sh(sys.executable, "-m", "megatron_rpt.pretrain", "--model-preset", "tiny", "--lr", "1e-3",
              "--train-iters", "5", "--tensor-model-parallel-size", "2", "--data-path", data / "missing",
              "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", data / "spm.model", check=False)
    assert proc.returncode == 2
    assert "world size 1 is not divisible" in proc.stderr
    assert "missing.bin and" in proc.stderr and "not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_tool_errors_are_clear(data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    proc = sh(sys.executable, "tools/preprocess_data.py", "--input", bad, "--tokenizer-type", "SentencePieceTokenizer",
              "--tokenizer-model", data / "spm.model", "--output-prefix", tmp_path / "x", "--no-progress", check=False)
    assert proc.returncode == 2 and f"{bad}:2: key 'text' is int, not a string" in proc.stderr
    proc = sh(sys.executable, "tools/train_tokenizer.py", "--input", tmp_path / "none.jsonl", "--vocab-size", "100",
              "--output-prefix", tmp_path / "t", check=False)
    assert proc.returncode == 2 and "matches no file" in proc.stderr
