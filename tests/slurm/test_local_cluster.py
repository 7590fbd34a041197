"""Through a real SLURM cluster started here (tests/slurm/cluster.py): sbatch of the CPU example
script (examples/slurm/pretrain_tiny_cpu.sbatch, 2 srun tasks = DP 2), and a preemption by
`scontrol requeue` in the middle of the run, after which the job resumes from its checkpoint and
ends with exactly the uninterrupted run's losses. Skipped, with the reason, where SLURM cannot be
started (not root, not Debian/Ubuntu, packages missing: .ci/run installs them)."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.test_pretrain_cli import losses
from tests.slurm.cluster import LocalSlurm, unavailable_reason

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "slurm" / "pretrain_tiny_cpu.sbatch"
ITERS = 60

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    c.start()
    try:
        yield c
    finally:
        c.stop()
        left = c.leftovers()
        assert not left, f"left running after the cluster was stopped: {left}"


def submit(cluster, run_dir: Path, **env) -> tuple[int, Path]:
    out = run_dir / "job.out"
    run_dir.mkdir(parents=True, exist_ok=True)
    job = cluster.sbatch("--chdir", ROOT, "--output", out, SCRIPT,
                         env={"RUN_DIR": str(run_dir), "MRPT_VENV": sys.prefix, "MRPT_HOME": str(ROOT),
                              "TRAIN_ITERS": str(ITERS), "PYTHONWARNINGS": "ignore", **env})
    return job, out


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("plain")
    job, out = submit(cluster, run_dir)
    info = cluster.wait(job, timeout=600)
    text = out.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-3000:]
    return text, run_dir


def test_sbatch_srun_pretraining_runs_and_checkpoints(uninterrupted):
    text, run_dir = uninterrupted
    assert "world size 2 (launcher slurm): TP=1 PP=1 DP=2" in text
    assert f"training stopped at iteration {ITERS} (train_iters)" in text
    assert sorted(losses(text)) == list(range(1, ITERS + 1))
    assert (run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == str(ITERS)
    assert "requeueing" not in text


def test_requeue_mid_run_resumes_and_ends_with_the_uninterrupted_losses(cluster, uninterrupted, tmp_path):
    reference = losses(uninterrupted[0])
    job, out = submit(cluster, tmp_path / "run")
    deadline = time.time() + 300
    while not (out.exists() and "iteration        5/" in out.read_text()):
        assert time.time() < deadline, out.read_text() if out.exists() else "no output"
        assert cluster.job(job)["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), cluster.job(job)
        time.sleep(0.2)
    cluster.cmd("scontrol", "requeue", job)  # preemption: SIGTERM to the job, then back into the queue
    # Slurm gives a requeued batch job a begin time about two minutes ahead (it sat PENDING for 139 s
    # here, most of this suite's SLURM time); an operator would release it now, and so do we once it
    # is back in the queue.
    while (info := cluster.job(job))["JobState"] != "PENDING":
        assert time.time() < deadline and info["JobState"] in ("RUNNING", "COMPLETING", "REQUEUED"), info
        time.sleep(0.2)
    cluster.cmd("scontrol", "update", f"JobId={job}", "StartTime=now")
    info = cluster.wait(job, until=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), timeout=600)
    text = out.read_text()
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == 1, (info, text[-3000:])
    stopped = int(re.search(r"training stopped at iteration (\d+) \(signal\)", text).group(1))
    assert 5 <= stopped < ITERS, text[-3000:]
    assert f"job {job} restart 1" in text and "resumed from" in text
    assert f"training stopped at iteration {ITERS} (train_iters)" in text
    after = text.split(f"job {job} restart 1")[1]
    resumed = losses(after)
    assert sorted(resumed) == list(range(stopped + 1, ITERS + 1))
    assert {i: reference[i] for i in resumed} == resumed
