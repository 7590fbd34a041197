"""Launcher environments (torchrun, SLURM srun, sbatch batch step, single) and hostlist parsing."""

import pytest

from megatron_rpt.distributed import init_distributed, parse_hostlist, resolve_dist_env


@pytest.mark.parametrize("expr,hosts", [
    ("localhost", ["localhost"]),
    ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
    ("node[8-11]", ["node8", "node9", "node10", "node11"]),
    ("node[08-11]", ["node08", "node09", "node10", "node11"]),
    ("a[1-2],b3,c[08-10]-ib", ["a1", "a2", "b3", "c08-ib", "c09-ib", "c10-ib"]),
    ("rack[1-2]-node[1-2]", ["rack1-node1", "rack1-node2", "rack2-node1", "rack2-node2"]),
    ("gpu-a12,login1", ["gpu-a12", "login1"]),
    ("x[5]", ["x5"]),
])
def test_parse_hostlist(expr, hosts):
    assert parse_hostlist(expr) == hosts


@pytest.mark.parametrize("expr,msg", [
    ("", "empty"), ("gpu[01-03", "unbalanced"), ("gpu01-03]", "unbalanced"), ("gpu[5-3]", "descending"),
    ("gpu[a-b]", "bad range"), ("a,,b", "empty host"), ("gpu[[1]]", "nested"), ("gpu[1-]", "bad range"),
])
def test_parse_hostlist_errors(expr, msg):
    with pytest.raises(ValueError, match=msg):
        parse_hostlist(expr)


def test_torchrun_env():
    env = resolve_dist_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                            "MASTER_ADDR": "n1", "MASTER_PORT": "29500"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.master_addr, env.master_port,
            env.launcher) == (3, 8, 1, 4, "n1", 29500, "torchrun")


SRUN = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
        "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456"}


def test_srun_task_env():
    env = resolve_dist_env(SRUN)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 4)
    assert env.master_addr == "gpu07" and env.launcher == "slurm" and env.job_id == "123456"
    assert env.master_port == 20000 + 123456 % 20000
    other = resolve_dist_env({**SRUN, "SLURM_JOB_ID": "123457"})
    assert other.master_port != env.master_port  # concurrent jobs on one node do not collide


def test_srun_explicit_master_and_tasks_per_node_forms():
    env = resolve_dist_env({**SRUN, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "4242",
                            "SLURM_TASKS_PER_NODE": "3,2(x2)"})
    assert (env.master_addr, env.master_port, env.local_world_size) == ("10.0.0.1", 4242, 3)
    env = resolve_dist_env({**SRUN, "SLURM_NTASKS_PER_NODE": "4"})
    assert env.local_world_size == 4


def test_sbatch_batch_step_is_a_single_process():
    for step in ("batch", "extern", "4294967294"):
        env = resolve_dist_env({**SRUN, "SLURM_STEP_ID": step, "SLURM_PROCID": "0"})
        assert (env.launcher, env.world_size, env.rank) == ("single", 1, 0)
    env = resolve_dist_env({k: v for k, v in SRUN.items() if k != "SLURM_STEP_ID"})
    assert env.launcher == "single"


def test_single_process():
    env = resolve_dist_env({})
    assert (env.rank, env.world_size, env.launcher, env.master_addr) == (0, 1, "single", "127.0.0.1")
    assert 0 < env.master_port < 65536


@pytest.mark.parametrize("environ,msg", [
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "a"}, "RANK=2 is out of range for WORLD_SIZE=2"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be >= 1"),
    ({"RANK": "1", "WORLD_SIZE": "2"}, "MASTER_ADDR is not"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "a"},
     "LOCAL_RANK=3 is out of range"),
    ({**SRUN, "SLURM_PROCID": "8"}, "SLURM_PROCID=8 is out of range for SLURM_NTASKS=8"),
    ({**SRUN, "SLURM_TASKS_PER_NODE": "(x2)"}, "SLURM_TASKS_PER_NODE"),
    ({**SRUN, "SLURM_JOB_NODELIST": "gpu[1-"}, "unbalanced"),
    ({k: v for k, v in SRUN.items() if k != "SLURM_JOB_ID"}, "SLURM_JOB_ID"),
])
def test_inconsistent_env_errors(environ, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        resolve_dist_env(environ)


def test_model_parallel_needs_enough_processes():
    with pytest.raises(ValueError, match="--tensor-model-parallel-size 2 .* needs 2 processes.*torchrun --nproc-per-node 2"):
        init_distributed(backend="gloo", device_type="cpu", tensor_model_parallel_size=2, environ={})
    with pytest.raises(ValueError, match="world size 3 is not divisible by --tensor-model-parallel-size 2"):
        init_distributed(backend="gloo", device_type="cpu", tensor_model_parallel_size=2,
                         environ={"RANK": "0", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"})
