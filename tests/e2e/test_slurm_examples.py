"""The SLURM example scripts: their mrpt-pretrain flags parse and validate for the node counts they request."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_moe_10b_sbatch_flags_validate():
    script = ROOT / "examples" / "slurm" / "pretrain_moe_10b.sbatch"
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "examples/slurm/check_flags.py"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
