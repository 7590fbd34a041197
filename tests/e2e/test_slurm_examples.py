"""The SLURM example scripts: their mrpt-pretrain / mrpt-rpt flags parse and validate for the node counts they request."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli import run_python

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name,layout", [
    ("pretrain_moe_10b.sbatch", "TP=1 PP=1 EP=8 ETP=1 DP=64 expert-DP=8"),
    ("pretrain_dense_4b.sbatch", "TP=2 PP=2 EP=1 ETP=2 DP=8"),
    ("pretrain_tiny_cpu.sbatch", "TP=1 PP=1 EP=1 ETP=1 DP=2"),
    ("rpt_dense_1b.sbatch", "TP=2 PP=1 EP=1 ETP=2 DP=4"),
])
def test_sbatch_scripts_parse_and_their_flags_validate(name, layout):
    script = ROOT / "examples" / "slurm" / name
    for path in (script, ROOT / "examples" / "slurm" / "mrpt_job.sh"):
        proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    text = script.read_text()
    for needed in ("#SBATCH --signal=USR1@", "#SBATCH --requeue", "--exit-signal-handler", "mrpt_run"):
        assert needed in text, f"{name} lacks {needed}"
    proc = run_python([sys.executable, "examples/slurm/check_flags.py", script], timeout=300)   # forked (tests/cli.py)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"layout: {layout}" in proc.stdout
