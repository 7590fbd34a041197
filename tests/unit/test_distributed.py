"""megatron_rpt.distributed: hostlists, launcher environments (torchrun, srun task, sbatch batch step,
single), every inconsistent-environment error, size validation, and a real 2-task gloo init through
the SLURM-variable path (TP=2, then PP=2 on the same process group) with Megatron-LM seeding."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import random
import re
import socket
import traceback

import pytest
import torch

from megatron_rpt import distributed as dist
from megatron_rpt.distributed import (DistEnv, destroy_distributed, init_distributed, parse_hostlist,
                                      print_rank_0, resolve_dist_env)


# ----------------------------------------------------------------------------------- hostlists

@pytest.mark.parametrize("expr,hosts", [
    ("localhost", ["localhost"]),
    ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
    ("node[8-11]", ["node8", "node9", "node10", "node11"]),
    ("node[08-11]", ["node08", "node09", "node10", "node11"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("n[001-003,010]", ["n001", "n002", "n003", "n010"]),
    ("a[1-2],b3,c[08-10]-ib", ["a1", "a2", "b3", "c08-ib", "c09-ib", "c10-ib"]),
    ("rack[1-2]-node[1-2]", ["rack1-node1", "rack1-node2", "rack2-node1", "rack2-node2"]),
    ("r[1-2]n[01,03]x", ["r1n01x", "r1n03x", "r2n01x", "r2n03x"]),
    ("gpu-a12,login1", ["gpu-a12", "login1"]),
    ("node[01-03,07],gpu-a12", ["node01", "node02", "node03", "node07", "gpu-a12"]),
    ("x[5]", ["x5"]),
    ("x[3-3]", ["x3"]),
    ("[1-2]", ["1", "2"]),
    ("host.example.org", ["host.example.org"]),
    ("  a[1-2] ", ["a1", "a2"]),
    ("a[1-2], b[3-4]", ["a1", "a2", "b3", "b4"]),
])
def test_parse_hostlist(expr, hosts):
    assert parse_hostlist(expr) == hosts


@pytest.mark.parametrize("expr,msg", [
    ("", "is empty"), ("   ", "is empty"),
    ("gpu[01-03", "unbalanced '\\['"), ("gpu01-03]", "unbalanced '\\]'"), ("a],b[1]", "unbalanced '\\]'"),
    ("gpu[1]]", "unbalanced '\\]'"), ("a[1],b[2", "unbalanced '\\['"),
    ("gpu[[1]]", "nested"),
    ("gpu[5-3]", "descending range '5-3'"), ("gpu[a-b]", "bad range 'a-b'"), ("gpu[1-]", "bad range '1-'"),
    ("gpu[-1]", "bad range '-1'"), ("gpu[]", "bad range ''"), ("gpu[1,,2]", "bad range ''"),
    ("gpu[1-2-3]", "bad range '1-2-3'"), ("gpu[1--2]", "bad range"),
    ("a,,b", "empty host name"), ("a,", "empty host name"), (",a", "empty host name"),
    ("a b", "whitespace"), ("a[ 1-2 ]", "whitespace"), ("n[0-99999999]", "more than"),
])
def test_parse_hostlist_errors(expr, msg):
    with pytest.raises(ValueError, match=msg) as info:
        parse_hostlist(expr)
    assert repr(expr) in str(info.value)  # the message names the expression


def test_parse_hostlist_rejects_non_strings():
    with pytest.raises(ValueError, match="empty"):
        parse_hostlist(None)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ torchrun

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
            "MASTER_ADDR": "n1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "run7"}


def test_torchrun_env():
    assert resolve_dist_env(TORCHRUN) == DistEnv(3, 8, 1, 4, "n1", 29500, "torchrun", "run7")


def test_torchrun_single_rank_needs_no_master():
    env = resolve_dist_env({"RANK": "0", "WORLD_SIZE": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.master_addr) == (0, 1, 0, 1, "127.0.0.1")
    assert env.launcher == "torchrun" and 0 < env.master_port < 65536


def test_torchrun_wins_over_slurm():
    # `srun torchrun ...`: each worker still carries the agent task's SLURM_* variables.
    env = resolve_dist_env({**SRUN, **TORCHRUN})
    assert (env.launcher, env.rank, env.world_size, env.master_addr, env.master_port) == ("torchrun", 3, 8, "n1", 29500)


# ---------------------------------------------------------------------------------------- srun

SRUN = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
        "SLURM_STEP_ID": "0", "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_JOB_ID": "123456"}


def test_srun_task_env():
    assert resolve_dist_env(SRUN) == DistEnv(5, 8, 1, 4, "gpu07", 20000 + 123456 % 20000, "slurm", "123456")


@pytest.mark.parametrize("job_id,port", [("123456", 23456), ("1", 20001), ("20000", 20000), ("39999", 39999),
                                         ("40000", 20000), ("4242", 24242)])
def test_master_port_derived_from_job_id(job_id, port):
    assert resolve_dist_env({**SRUN, "SLURM_JOB_ID": job_id}).master_port == port


def test_concurrent_jobs_get_different_ports():
    ports = {resolve_dist_env({**SRUN, "SLURM_JOB_ID": str(j)}).master_port for j in range(1000, 1100)}
    assert len(ports) == 100


def test_srun_explicit_master_overrides():
    env = resolve_dist_env({**SRUN, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "4242"})
    assert (env.master_addr, env.master_port, env.launcher) == ("10.0.0.1", 4242, "slurm")
    env = resolve_dist_env({**SRUN, "MASTER_PORT": "4243"})
    assert (env.master_addr, env.master_port) == ("gpu07", 4243)
    env = resolve_dist_env({**SRUN, "MASTER_ADDR": "head"})
    assert (env.master_addr, env.master_port) == ("head", 23456)
    # an explicit port makes the job id unnecessary
    no_job = {k: v for k, v in SRUN.items() if k != "SLURM_JOB_ID"}
    env = resolve_dist_env({**no_job, "MASTER_PORT": "5000"})
    assert (env.master_port, env.job_id) == (5000, None)


def test_srun_nodelist_sources():
    env = {k: v for k, v in SRUN.items() if k != "SLURM_JOB_NODELIST"}
    assert resolve_dist_env({**env, "SLURM_NODELIST": "localhost"}).master_addr == "localhost"
    # The step's own node list comes first: a step may run on a subset of the job's nodes.
    both = {**SRUN, "SLURM_STEP_NODELIST": "gpu[08]", "SLURM_NODELIST": "gpu[07-08]"}
    assert resolve_dist_env(both).master_addr == "gpu08"
    assert resolve_dist_env({**env, "SLURM_JOB_NODELIST": "rack[2-3]-n[09-10]"}).master_addr == "rack2-n09"


@pytest.mark.parametrize("extra,ntasks,rank,nodeid,local_world", [
    ({"SLURM_TASKS_PER_NODE": "4(x2)"}, 8, 5, "1", 4),
    ({"SLURM_TASKS_PER_NODE": "3,2(x2)"}, 7, 0, "0", 3),
    ({"SLURM_TASKS_PER_NODE": "3,2(x2)"}, 7, 6, "2", 2),
    ({"SLURM_TASKS_PER_NODE": "4(x2),3"}, 11, 9, "2", 3),
    ({"SLURM_TASKS_PER_NODE": "1(x3),2(x2)"}, 7, 5, "4", 2),
    # without SLURM_NODEID the node follows from the rank (SLURM's default block distribution)
    ({"SLURM_TASKS_PER_NODE": "4(x2),3"}, 11, 9, None, 3),
    ({"SLURM_TASKS_PER_NODE": "4(x2),3"}, 11, 4, None, 4),
    ({"SLURM_TASKS_PER_NODE": "3,2(x2)"}, 7, 3, None, 2),
    # step-level counts beat job-level ones and the --ntasks-per-node inherited from sbatch
    ({"SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_TASKS_PER_NODE": "8", "SLURM_NTASKS_PER_NODE": "8"}, 4, 1, "0", 2),
    ({"SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_NTASKS_PER_NODE": "8"}, 4, 1, "0", 2),
    ({"SLURM_NTASKS_PER_NODE": "4"}, 8, 5, "1", 4),
    ({}, 8, 5, "1", 8),  # nothing said: all tasks count as local
])
def test_srun_tasks_per_node_forms(extra, ntasks, rank, nodeid, local_world):
    base = {k: v for k, v in SRUN.items() if k not in ("SLURM_TASKS_PER_NODE", "SLURM_NODEID")}
    environ = {**base, **extra, "SLURM_PROCID": str(rank), "SLURM_NTASKS": str(ntasks), "SLURM_LOCALID": "0"}
    if nodeid is not None:
        environ["SLURM_NODEID"] = nodeid
    env = resolve_dist_env(environ)
    assert (env.launcher, env.rank, env.world_size, env.local_world_size) == ("slurm", rank, ntasks, local_world)


def test_srun_old_stepid_and_jobid_names():
    old = {k: v for k, v in SRUN.items() if k not in ("SLURM_STEP_ID", "SLURM_JOB_ID")}
    env = resolve_dist_env({**old, "SLURM_STEPID": "3", "SLURM_JOBID": "77"})
    assert (env.launcher, env.job_id, env.master_port) == ("slurm", "77", 20077)


# ------------------------------------------------------------------- sbatch script, salloc, single

@pytest.mark.parametrize("step", ["batch", "extern", "interactive", "4294967294", "4294967295",
                                  "4294967291", "4294967292", "4294967290", "", "0.1"])
def test_sbatch_batch_and_special_steps_are_a_single_process(step):
    env = resolve_dist_env({**SRUN, "SLURM_STEP_ID": step, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"})
    assert (env.launcher, env.rank, env.world_size, env.local_world_size, env.master_addr) == ("single", 0, 1, 1, "127.0.0.1")
    assert env.job_id == "123456"


def test_sbatch_without_step_and_salloc_shell_are_single():
    no_step = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_ID"}
    assert resolve_dist_env(no_step).launcher == "single"
    salloc = {k: v for k, v in SRUN.items() if k not in ("SLURM_PROCID", "SLURM_LOCALID")}
    assert resolve_dist_env(salloc).launcher == "single"
    no_ntasks = {k: v for k, v in SRUN.items() if k != "SLURM_NTASKS"}
    assert resolve_dist_env(no_ntasks).launcher == "single"


def test_single_process():
    env = resolve_dist_env({})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.master_addr, env.launcher,
            env.job_id) == (0, 1, 0, 1, "127.0.0.1", "single", None)
    with socket.socket() as s:  # the port is really free
        s.bind(("127.0.0.1", env.master_port))


def test_default_environ_is_os_environ(monkeypatch):
    for name in list(os.environ):
        if name.startswith("SLURM_") or name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "h")
    monkeypatch.setenv("MASTER_PORT", "1234")
    env = resolve_dist_env()
    assert (env.launcher, env.rank, env.world_size, env.master_port) == ("torchrun", 1, 2, 1234)


# ---------------------------------------------------------------------------- inconsistent values

_T2 = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "29500"}


@pytest.mark.parametrize("environ,msg", [
    ({**_T2, "RANK": "x"}, "RANK='x' is not an integer"),
    ({**_T2, "WORLD_SIZE": "2.0"}, "WORLD_SIZE='2.0' is not an integer"),
    ({**_T2, "RANK": "2"}, "RANK=2 is out of range for WORLD_SIZE=2"),
    ({**_T2, "RANK": "-1"}, "RANK=-1 is out of range for WORLD_SIZE=2"),
    ({**_T2, "WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be >= 1"),
    ({**_T2, "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2"}, "LOCAL_RANK=3 is out of range"),
    ({**_T2, "LOCAL_RANK": "-1"}, "LOCAL_RANK=-1 is out of range"),
    ({**_T2, "LOCAL_RANK": "one"}, "LOCAL_RANK='one' is not an integer"),
    ({**_T2, "LOCAL_WORLD_SIZE": "0"}, "LOCAL_WORLD_SIZE=0"),
    ({**_T2, "LOCAL_WORLD_SIZE": "3"}, "LOCAL_WORLD_SIZE=3"),
    ({k: v for k, v in _T2.items() if k != "MASTER_ADDR"}, "MASTER_ADDR is not"),
    ({k: v for k, v in _T2.items() if k != "MASTER_PORT"}, "MASTER_PORT is not"),
    ({**_T2, "MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a TCP port"),
    ({**_T2, "MASTER_PORT": "0"}, "MASTER_PORT=0 is not a TCP port"),
    ({**_T2, "MASTER_PORT": "http"}, "MASTER_PORT='http' is not an integer"),
    ({"RANK": "0"}, "RANK is set but WORLD_SIZE is not"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE is set but RANK is not"),
    ({**SRUN, "SLURM_PROCID": "8"}, "SLURM_PROCID=8 is out of range for SLURM_NTASKS=8"),
    ({**SRUN, "SLURM_PROCID": "five"}, "SLURM_PROCID='five' is not an integer"),
    ({**SRUN, "SLURM_NTASKS": ""}, "SLURM_NTASKS='' is not an integer"),
    ({**SRUN, "SLURM_NTASKS": "0", "SLURM_PROCID": "0"}, "SLURM_NTASKS=0 must be >= 1"),
    ({**SRUN, "SLURM_LOCALID": "4"}, "SLURM_LOCALID=4 is out of range for 4 tasks on this node \\(SLURM_TASKS_PER_NODE\\)"),
    ({**SRUN, "SLURM_LOCALID": "x"}, "SLURM_LOCALID='x' is not an integer"),
    ({**SRUN, "SLURM_TASKS_PER_NODE": "(x2)"}, "SLURM_TASKS_PER_NODE='\\(x2\\)' is malformed"),
    ({**SRUN, "SLURM_TASKS_PER_NODE": "4(x0)"}, "SLURM_TASKS_PER_NODE='4\\(x0\\)' is malformed"),
    ({**SRUN, "SLURM_TASKS_PER_NODE": "0"}, "SLURM_TASKS_PER_NODE='0' is malformed"),
    ({**SRUN, "SLURM_TASKS_PER_NODE": "4(x2"}, "SLURM_TASKS_PER_NODE='4\\(x2' is malformed"),
    ({**SRUN, "SLURM_STEP_TASKS_PER_NODE": "4,,4"}, "SLURM_STEP_TASKS_PER_NODE='4,,4' is malformed"),
    ({**SRUN, "SLURM_TASKS_PER_NODE": "16(x2)"}, "SLURM_TASKS_PER_NODE=16 \\(tasks on this node\\) must be between 1 and SLURM_NTASKS=8"),
    ({**SRUN, "SLURM_NODEID": "2"}, "SLURM_NODEID=2 is out of range"),
    ({**SRUN, "SLURM_NODEID": "n"}, "SLURM_NODEID='n' is not an integer"),
    ({**{k: v for k, v in SRUN.items() if k != "SLURM_TASKS_PER_NODE"}, "SLURM_NTASKS_PER_NODE": "x"},
     "SLURM_NTASKS_PER_NODE='x' is not an integer"),
    ({**SRUN, "SLURM_JOB_NODELIST": "gpu[1-"}, "hostlist 'gpu\\[1-': unbalanced"),
    ({k: v for k, v in SRUN.items() if k != "SLURM_JOB_NODELIST"}, "SLURM_JOB_NODELIST/SLURM_NODELIST.*set MASTER_ADDR"),
    ({k: v for k, v in SRUN.items() if k != "SLURM_JOB_ID"}, "SLURM_JOB_ID.*set MASTER_PORT"),
    ({**SRUN, "SLURM_JOB_ID": "123_4"}, "SLURM_JOB_ID='123_4' is not an integer"),
    ({**SRUN, "SLURM_JOB_ID": "12345.0"}, "SLURM_JOB_ID='12345.0' is not an integer"),
    ({**_T2, "RANK": "1_0"}, "RANK='1_0' is not an integer"),
    ({**_T2, "RANK": "١"}, "is not an integer"),  # non-ASCII digits that int() would accept
    ({**SRUN, "MASTER_PORT": "99999"}, "MASTER_PORT=99999 is not a TCP port"),
])
def test_inconsistent_env_errors(environ, msg):
    with pytest.raises(ValueError, match=msg):
        resolve_dist_env(environ)


# ----------------------------------------------------------------------- init_distributed sizes

def _no_pg():
    assert not torch.distributed.is_initialized()  # these checks run before any process group


def test_model_parallel_needs_enough_processes():
    _no_pg()
    with pytest.raises(ValueError) as info:
        init_distributed(backend="gloo", device_type="cpu", tensor_model_parallel_size=2,
                         pipeline_model_parallel_size=2, environ={})
    msg = str(info.value)
    assert "--tensor-model-parallel-size 2 x --pipeline-model-parallel-size 2 x --context-parallel-size 1 = 4" in msg
    assert "needs 4 processes" in msg and "torchrun --nproc-per-node 4" in msg and "srun -n 4" in msg
    with pytest.raises(ValueError, match="--context-parallel-size 2 = 2 needs 2 processes"):
        init_distributed(backend="gloo", device_type="cpu", context_parallel_size=2, environ={})
    _no_pg()


@pytest.mark.parametrize("world,kwargs,msg", [
    (3, dict(tensor_model_parallel_size=2), "world size 3 is not divisible by --tensor-model-parallel-size 2 x "
                                            "--pipeline-model-parallel-size 1 x --context-parallel-size 1 = 2"),
    (6, dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2), "world size 6 is not divisible"),
    (4, dict(tensor_model_parallel_size=8), "world size 4 is not divisible by --tensor-model-parallel-size 8"),
    (4, dict(pipeline_model_parallel_size=8), "--pipeline-model-parallel-size 8"),
    (4, dict(expert_model_parallel_size=3), "--expert-model-parallel-size 3 x --expert-tensor-parallel-size 1 = 3 "
                                            "does not divide the 4 ranks of a pipeline stage"),
    (8, dict(pipeline_model_parallel_size=2, expert_model_parallel_size=4, expert_tensor_parallel_size=2),
     "= 8 does not divide the 4 ranks of a pipeline stage"),
    (4, dict(tensor_model_parallel_size=0), "--tensor-model-parallel-size 0 must be a positive integer"),
    (4, dict(pipeline_model_parallel_size=-1), "--pipeline-model-parallel-size -1 must be a positive integer"),
    (4, dict(virtual_pipeline_model_parallel_size=0), "--virtual-pipeline-model-parallel-size 0 must be"),
    (4, dict(expert_tensor_parallel_size=0), "--expert-tensor-parallel-size 0 must be"),
    (4, dict(context_parallel_size=1.5), "--context-parallel-size 1.5 must be a positive integer"),
    (4, dict(timeout_minutes=0), "--distributed-timeout-minutes 0 must be positive"),
])
def test_sizes_must_fit_the_world(world, kwargs, msg):
    _no_pg()
    environ = {"RANK": "0", "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    with pytest.raises(ValueError, match=re.escape(msg)):
        init_distributed(backend="gloo", device_type="cpu", environ=environ, **kwargs)
    _no_pg()


def test_parallel_state_keywords_follow_the_installed_signature():
    def older(tensor_model_parallel_size=1, pipeline_model_parallel_size=1):  # lacks cp / vp / timeout
        pass

    wanted = dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=1,
                  virtual_pipeline_model_parallel_size=2, context_parallel_size=1,
                  distributed_timeout_minutes=10)
    assert dist._parallel_state_kwargs(older, wanted) == {"tensor_model_parallel_size": 2,
                                                          "pipeline_model_parallel_size": 1}
    with pytest.raises(RuntimeError, match="--context-parallel-size 2"):
        dist._parallel_state_kwargs(older, {**wanted, "context_parallel_size": 2})

    def anything(**kw):
        pass

    assert dist._parallel_state_kwargs(anything, wanted) == wanted
    from megatron.core import parallel_state
    assert dist._parallel_state_kwargs(parallel_state.initialize_model_parallel, wanted) == wanted


# ------------------------------------------------------------------------------ misc helpers

def test_print_rank_0_and_destroy_without_process_group(capsys):
    _no_pg()
    print_rank_0("hello", 3, sep="-")
    assert capsys.readouterr().out == "hello-3\n"
    destroy_distributed()
    destroy_distributed()  # idempotent
    _no_pg()


def test_seed_rejects_negative():
    with pytest.raises(ValueError, match="--seed -1"):
        dist.set_random_seed(-1)


@pytest.mark.slow   # a fresh interpreter
def test_seed_on_cpu_without_platform_says_what_to_do():
    """In a fresh interpreter (the suite's own process has the platform set up already)."""
    import subprocess
    import sys
    code = (
        "import random, torch, pytest\n"
        "from megatron_rpt import distributed as dist\n"
        "with pytest.raises(RuntimeError, match='setup_platform'):\n"
        "    dist.set_random_seed(7)\n"
        "# python, numpy and torch were seeded before the tracker step complained\n"
        "assert random.random() == random.Random(7).random()\n"
        "g = torch.Generator().manual_seed(7)\n"
        "assert torch.equal(torch.rand(4), torch.rand(4, generator=g))\n"
        "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


# ------------------------------------------------- real 2-task init through the SLURM variables

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_RUN_ID")


def _slurm_task(procid: int, job_id: str, out) -> None:
    """One `srun -n 2` task: init through SLURM variables, check groups, collectives and seeds."""
    try:
        torch.set_num_threads(1)
        for name in list(os.environ):  # pytest itself may run inside a SLURM job or under torchrun
            if name.startswith("SLURM_") or name in _LAUNCH_VARS:
                del os.environ[name]
        os.environ.update(SLURM_PROCID=str(procid), SLURM_NTASKS="2", SLURM_LOCALID=str(procid),
                          SLURM_NODEID="0", SLURM_STEP_ID="0", SLURM_TASKS_PER_NODE="2",
                          SLURM_NODELIST="localhost", SLURM_JOB_ID=job_id)
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import get_cuda_rng_tracker
        from megatron_rpt.platform import setup_platform

        platform = setup_platform(force_cpu=True)
        res: dict = {}
        env = init_distributed(backend=platform.backend, device_type=platform.device_type,
                               tensor_model_parallel_size=2, timeout_minutes=1)
        res["env"] = env
        res["environ"] = (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"])
        res["tp"] = (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
                     ps.get_data_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
        t = torch.tensor([float(env.rank + 1)])
        torch.distributed.all_reduce(t, group=ps.get_tensor_model_parallel_group())
        res["tp_sum"] = t.item()
        dist.set_random_seed(1234)
        # Results go back as lists: a pickled tensor would travel through torch's shared-memory
        # reducers, whose file descriptors die with this process.
        res["tp_default"] = torch.rand(4).tolist()
        with get_cuda_rng_tracker().fork():
            res["tp_tracker"] = torch.rand(4).tolist()
        res["tp_py"] = random.random()

        # Same process group, new layout: PP=2 (the existing group is reused, parallel_state redone).
        env2 = init_distributed(backend=platform.backend, device_type=platform.device_type,
                                pipeline_model_parallel_size=2, timeout_minutes=1)
        res["pp"] = (env2.rank, ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size(),
                     ps.get_tensor_model_parallel_world_size())
        dist.set_random_seed(1234)
        res["pp_default"] = torch.rand(4).tolist()
        try:  # the environment now disagrees with the existing group
            init_distributed(backend="gloo", device_type="cpu",
                             environ={**os.environ, "SLURM_PROCID": str(1 - procid)})
            res["mismatch"] = None
        except ValueError as exc:
            res["mismatch"] = str(exc)
        print_rank_0(f"printed by rank {env.rank}")
        destroy_distributed()
        destroy_distributed()
        res["destroyed"] = (torch.distributed.is_initialized(), ps.model_parallel_is_initialized())
        out.put((procid, "ok", res))
    except BaseException:  # noqa: BLE001 - report to the parent instead of hanging it
        out.put((procid, "err", traceback.format_exc()))


def _free_port_for_job() -> tuple[int, str]:
    """A free port in 20000-39999 and a job id that derives it (job id != port, to test the modulo)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 40000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port, str(port - 20000 + 20000 * rng.randrange(2, 50))
    pytest.skip("no free port in 20000-39999")


def test_two_srun_tasks_init_tp2_then_pp2(capfd):
    _no_pg()
    port, job_id = _free_port_for_job()
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_slurm_task, args=(i, job_id, out)) for i in range(2)]
    for p in procs:
        p.start()
    try:
        results = {}
        for _ in procs:
            procid, status, res = out.get(timeout=90)
            assert status == "ok", f"task {procid} failed:\n{res}"
            results[procid] = res
    except queue_mod.Empty:
        pytest.fail("a SLURM task hung")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]

    for rank in (0, 1):
        r = results[rank]
        assert r["env"] == DistEnv(rank, 2, rank, 2, "localhost", port, "slurm", job_id)
        assert r["environ"] == ("localhost", str(port))
        assert r["tp"] == (rank, 2, 1, 1)  # TP rank, TP world, DP world, PP world
        assert r["tp_sum"] == 3.0
        assert r["pp"] == (rank, rank, 2, 1)
        assert "already initialised as rank" in r["mismatch"]
        assert r["destroyed"] == (False, False)
    # TP ranks share the default stream (same seed) but not the tensor-parallel tracker stream.
    assert results[0]["tp_default"] == results[1]["tp_default"] == _rand_after_seed(1234).tolist()
    assert results[0]["tp_py"] == results[1]["tp_py"] == random.Random(1234).random()
    assert results[0]["tp_tracker"] != results[1]["tp_tracker"]
    # Pipeline stages: seed + 100 x PP rank (Megatron-LM convention).
    assert results[0]["pp_default"] == _rand_after_seed(1234).tolist()
    assert results[1]["pp_default"] == _rand_after_seed(1334).tolist()
    printed = capfd.readouterr().out
    assert "printed by rank 0" in printed and "printed by rank 1" not in printed
    _no_pg()


def _rand_after_seed(seed: int) -> torch.Tensor:
    return torch.rand(4, generator=torch.Generator().manual_seed(seed))
