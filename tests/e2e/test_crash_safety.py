"""Crash safety of checkpointing through the CLI (2 ranks with torchrun's environment, forked by
tests/cli.py; the SIGUSR1 test under torchrun itself, as SLURM signals the ranks): SIGKILL at three points of
a save (faults.POINTS) leaves the previous checkpoint loadable and marked latest, and the resumed run
ends with exactly the losses of an uninterrupted run; SIGUSR1 saves and exits cleanly; a corrupt
latest checkpoint is a clear error, or with --ckpt-fallback-to-previous the previous one is used."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.cli import run_python
from tests.e2e.test_pretrain_cli import ROOT, losses

ITERS = 6


def args(ckpt, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "megatron_rpt.pretrain", "--model-preset", "tiny", "--num-layers", "2", "--hidden-size", "64",
            "--ffn-hidden-size", "128", "--num-attention-heads", "4", "--seq-length", "32",
            "--max-position-embeddings", "32", "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "255",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "3e-3", "--lr-warmup-iters", "1",
            "--train-iters", str(ITERS), "--log-interval", "1", "--eval-interval", "0", "--use-cpu",
            "--save", str(ckpt), "--load", str(ckpt), "--save-interval", "2", *extra]


def run(argv, env=None, check=True):
    """The run forked from pytest with torchrun's rank environment (tests/cli.py: each rank in its
    own process group, ended with whatever it started, e.g. a SIGKILLed rank's orphaned checkpoint
    writers, as SLURM ends a step)."""
    done = run_python(argv, env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}, timeout=300)
    if check and done.returncode != 0:
        raise AssertionError(f"exit {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def _kill_session(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return losses(run(args(tmp_path_factory.mktemp("ref") / "ckpt")).stdout)


@pytest.mark.parametrize("point,extra", [("save-begin", []), ("save-written", []), ("save-published", []),
                                         ("save-scheduled", ["--async-save"])],
                         ids=["save-begin", "save-written", "save-published", "async-save-scheduled"])
def test_sigkill_during_save_then_resume_matches_uninterrupted(tmp_path, reference, point, extra):
    """async-save-scheduled: rank 0 dies while its writer process writes iteration 4 in the background
    (rank 1 trains on); the resume (itself with --async-save) loads iteration 2."""
    ckpt = tmp_path / "ckpt"
    killed = run(args(ckpt, *extra), env={"MRPT_FAULT_INJECT": f"{point}@4"}, check=False)
    assert killed.returncode != 0
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert (ckpt / "iter_0000004").exists() == (point == "save-published")
    resumed = run(args(ckpt, *extra)).stdout
    assert "iter_0000002" in resumed and "resumed from" in resumed
    got = losses(resumed)
    assert sorted(got) == [3, 4, 5, 6]
    assert {i: reference[i] for i in got} == got
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == str(ITERS)
    assert not [p for p in ckpt.iterdir() if p.name.endswith((".tmp", ".old"))]


def test_sigusr1_saves_and_exits_cleanly_then_resumes(tmp_path, reference):
    ckpt = tmp_path / "ckpt"
    proc = subprocess.Popen([str(a) for a in args(ckpt, "--exit-signal-handler", "--save-interval", "100")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"}, start_new_session=True)
    out = []
    try:
        deadline = time.time() + 300
        for line in proc.stdout:
            out.append(line)
            if line.startswith("> world size"):  # every rank has its handler (installed before init)
                # As SLURM's --signal does for the tasks of a step: every rank (not torchrun) gets it.
                workers = open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()
                assert len(workers) == 2, workers
                for pid in workers:
                    os.kill(int(pid), signal.SIGUSR1)
                break
            assert time.time() < deadline, "".join(out)
        out += proc.stdout.readlines()
        assert proc.wait(timeout=120) == 0, "".join(out)[-3000:]
    finally:
        _kill_session(proc.pid)
    text = "".join(out)
    # The signal lands before the first step, so the run stops at iteration 1; a loaded machine may
    # deliver the line late, so any iteration short of the end is accepted, and must be the one saved.
    stopped = re.search(r"> training stopped at iteration (\d+) \(signal\)", text)
    assert stopped and int(stopped.group(1)) < ITERS, text[-3000:]
    at = int(stopped.group(1))
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == str(at)
    got = losses(run(args(ckpt, "--exit-signal-handler")).stdout)
    assert sorted(got) == list(range(at + 1, ITERS + 1))
    assert {i: reference[i] for i in got} == got


def test_corrupt_latest_checkpoint_is_named_or_skipped_with_the_fallback_flag(tmp_path, reference):
    ckpt = tmp_path / "ckpt"
    run(args(ckpt, "--exit-interval", "4"))
    (data,) = sorted((ckpt / "iter_0000004").glob("*.distcp"))[:1]
    data.write_bytes(data.read_bytes()[:100])
    proc = run(args(ckpt), check=False)
    assert proc.returncode != 0
    assert f"iter_0000004: data file {data.name} has 100 bytes" in proc.stdout + proc.stderr
    resumed = run(args(ckpt, "--ckpt-fallback-to-previous"))
    assert "--ckpt-fallback-to-previous" in resumed.stderr and "iter_0000002" in resumed.stdout
    got = losses(resumed.stdout)
    assert sorted(got) == [3, 4, 5, 6] and {i: reference[i] for i in got} == got
