"""A real 2-process gloo init through the SLURM-variable path (as `srun -n 2` would start it)."""

import multiprocessing as mp
import os
import socket


def _task(procid, port, queue):
    import torch
    torch.set_num_threads(1)
    os.environ.update(SLURM_PROCID=str(procid), SLURM_NTASKS="2", SLURM_LOCALID=str(procid), SLURM_STEP_ID="0",
                      SLURM_TASKS_PER_NODE="2", SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID="4242",
                      MASTER_PORT=str(port))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        os.environ.pop(var, None)
    from megatron_rpt.platform import setup_platform
    from megatron_rpt import distributed as dist
    from megatron.core import parallel_state as ps
    try:
        setup_platform(force_cpu=True)
        env = dist.init_distributed(backend="gloo", device_type="cpu", tensor_model_parallel_size=2)
        t = torch.tensor([float(env.rank + 1)])
        torch.distributed.all_reduce(t, group=ps.get_tensor_model_parallel_group())
        queue.put((env.launcher, env.rank, env.master_addr, ps.get_tensor_model_parallel_rank(),
                   ps.get_tensor_model_parallel_world_size(), float(t)))
    finally:
        dist.destroy_distributed()


def test_two_srun_tasks_form_a_tp2_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_task, args=(i, port, queue)) for i in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert results == [("slurm", 0, "localhost", 0, 2, 3.0), ("slurm", 1, "localhost", 1, 2, 3.0)]
