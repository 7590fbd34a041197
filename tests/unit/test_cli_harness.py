"""tests/cli.py: a forked CLI run gives what a fresh interpreter (and torchrun) would: argv, working
directory, environment, separate stdout/stderr, exit codes (SystemExit, exceptions, signals), the
rank environment of torchrun with merged output, a failed rank ending its peers, and a timeout."""

import os
import signal
import subprocess
import sys

import pytest

from tests.cli import ROOT, run_cli, run_python

SHOW = "import os, sys; print(sys.argv[1:], os.getcwd(), os.environ.get('X')); print('err', file=sys.stderr)"


def test_argv_cwd_env_and_streams(tmp_path):
    r = run_cli("-c", SHOW, "a", "b c", env=dict(os.environ, X="1"), cwd=tmp_path)
    assert (r.returncode, r.stdout, r.stderr) == (0, f"['a', 'b c'] {tmp_path} 1\n", "err\n")
    assert run_python([sys.executable, "-c", SHOW, "z"]).stdout == f"['z'] {ROOT} None\n"
    assert os.environ.get("X") is None and os.getcwd() != str(tmp_path)   # the parent is untouched


def test_exit_codes_as_an_interpreter_gives_them():
    assert run_cli("-c", "import sys; sys.exit(3)").returncode == 3
    r = run_cli("-c", "import sys; sys.exit('bad flag')")
    assert r.returncode == 1 and r.stderr == "bad flag\n"
    r = run_cli("-c", "raise ValueError('boom')")
    assert r.returncode == 1 and "Traceback" in r.stderr and "ValueError: boom" in r.stderr
    r = run_cli("-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert r.returncode == -signal.SIGKILL
    with pytest.raises(AssertionError, match="failed \\(3\\)"):
        run_cli("-c", "import sys; sys.exit(3)", check=True)


def test_module_and_script_targets():
    r = run_python([sys.executable, "tools/merge_datasets.py", "--help"])
    assert r.returncode == 0 and "usage:" in r.stdout
    r = run_python([sys.executable, "-m", "megatron_rpt.pretrain", "--help"])
    assert r.returncode == 0 and "--tensor-model-parallel-size" in r.stdout


def test_torchrun_environment_merged_output_and_a_failing_rank():
    code = ("import os; print(os.environ['RANK'], os.environ['LOCAL_RANK'], os.environ['WORLD_SIZE'], "
            "os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT']) > 0)")
    r = run_cli("-c", code, nproc=2)
    assert r.returncode == 0 and sorted(r.stdout.splitlines()) == ["0 0 2 127.0.0.1 True", "1 1 2 127.0.0.1 True"]
    r = run_python([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    "-m", "megatron_rpt.pretrain", "--help"])
    assert r.returncode == 0 and r.stdout.count("usage:") == 2
    # rank 1 fails, rank 0 would wait forever (as in a collective): it is ended, the failure reported
    hang = "import os, sys, time\nif os.environ['RANK'] == '1': sys.exit(7)\ntime.sleep(600)"
    r = run_cli("-c", hang, nproc=2, timeout=60)
    assert r.returncode == 7


def test_timeout_kills_the_run():
    with pytest.raises(subprocess.TimeoutExpired):
        run_cli("-c", "import time; time.sleep(600)", timeout=1)
