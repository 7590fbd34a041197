"""Process-group bootstrap: torchrun or SLURM `srun` environments -> torch.distributed + parallel_state.

Launchers, in order of precedence:
1. torchrun (RANK and WORLD_SIZE set; LOCAL_RANK, MASTER_ADDR/PORT come from torchrun);
2. a SLURM task started by `srun` (SLURM_PROCID, SLURM_NTASKS and SLURM_STEP_ID set): rank, world
   size and local rank come from SLURM; MASTER_ADDR is the first host of the job's node list
   (hostlist expressions are parsed here, no `scontrol` needed) and MASTER_PORT is derived from the
   job id so that concurrent jobs sharing a node do not collide; explicit MASTER_ADDR/PORT win.
   An `sbatch` batch script itself (no step id, or the batch step) is NOT a task: it runs as a
   single process, which is what `python -m megatron_rpt.pretrain` outside `srun` should do;
3. a single process.
"""

from __future__ import annotations

import inspect
import os
import random
import re
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Optional

import numpy as np
import torch


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"
    job_id: Optional[str] = None


_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top_level(expr: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, cur = [], 0, []
    for ch in expr:
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"hostlist {expr!r}: nested brackets")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"hostlist {expr!r}: unbalanced ']'")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise ValueError(f"hostlist {expr!r}: unbalanced '['")
    parts.append("".join(cur))
    return parts


def _expand_ranges(body: str, expr: str) -> list[str]:
    out = []
    for item in body.split(","):
        m = _RANGE.match(item.strip())
        if not m:
            raise ValueError(f"hostlist {expr!r}: bad range {item!r} inside brackets")
        lo, hi = m.group(1), m.group(2)
        if hi is None:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"hostlist {expr!r}: descending range {item!r}")
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    return out


def _expand_host(pattern: str, expr: str) -> list[str]:
    hosts = [""]
    pos = 0
    for m in re.finditer(r"\[([^\]]*)\]", pattern):
        prefix = pattern[pos:m.start()]
        hosts = [h + prefix + r for h in hosts for r in _expand_ranges(m.group(1), expr)]
        pos = m.end()
    hosts = [h + pattern[pos:] for h in hosts]
    return hosts


def parse_hostlist(expr: str) -> list[str]:
    """Expand a SLURM hostlist such as 'gpu[01-03,07],login1' (zero padding kept, SLURM order)."""
    if expr is None or not expr.strip():
        raise ValueError("hostlist is empty")
    hosts: list[str] = []
    for part in _split_top_level(expr.strip()):
        part = part.strip()
        if not part:
            raise ValueError(f"hostlist {expr!r}: empty host name")
        if "[" in part and "]" not in part or "]" in part and "[" not in part:
            raise ValueError(f"hostlist {expr!r}: unbalanced brackets in {part!r}")
        hosts.extend(_expand_host(part, expr))
    return hosts


def _int(environ: Mapping[str, str], name: str) -> int:
    value = environ.get(name)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _tasks_on_first_node(spec: str) -> int:
    """SLURM_TASKS_PER_NODE like '4(x2),3' -> 4 (tasks of this job on its first node)."""
    m = re.match(r"^(\d+)", spec or "")
    if not m:
        raise ValueError(f"environment variable SLURM_TASKS_PER_NODE={spec!r} is malformed")
    return int(m.group(1))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _is_srun_task(environ: Mapping[str, str]) -> bool:
    step = environ.get("SLURM_STEP_ID")
    # The batch script runs as step "batch" (older SLURM: 4294967294); "extern" is not a task either.
    return ("SLURM_PROCID" in environ and "SLURM_NTASKS" in environ and step is not None
            and step not in ("batch", "extern", "4294967294", "4294967295"))


def _check(rank: int, world: int, local_rank: int, local_world: int, names: tuple[str, str, str]) -> None:
    if world < 1:
        raise ValueError(f"environment variable {names[1]}={world} must be >= 1")
    if not 0 <= rank < world:
        raise ValueError(f"environment variable {names[0]}={rank} is out of range for {names[1]}={world}")
    if not 0 <= local_rank < max(local_world, 1):
        raise ValueError(f"environment variable {names[2]}={local_rank} is out of range "
                         f"(tasks on this node: {local_world})")


def resolve_dist_env(environ: Optional[Mapping[str, str]] = None) -> DistEnv:
    """Work out rank/world/master from the launcher's environment (see module docstring)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        local_world = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world
        _check(rank, world, local_rank, local_world, ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        if world > 1 and "MASTER_ADDR" not in env:
            raise ValueError("RANK/WORLD_SIZE are set but MASTER_ADDR is not; launch with torchrun "
                             "or set MASTER_ADDR and MASTER_PORT")
        return DistEnv(rank, world, local_rank, local_world, env.get("MASTER_ADDR", "127.0.0.1"),
                       _int(env, "MASTER_PORT") if "MASTER_PORT" in env else _free_port(), "torchrun",
                       env.get("TORCHELASTIC_RUN_ID"))
    if _is_srun_task(env):
        rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
        local_rank = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        if "SLURM_NTASKS_PER_NODE" in env:
            local_world = _int(env, "SLURM_NTASKS_PER_NODE")
        elif "SLURM_STEP_TASKS_PER_NODE" in env or "SLURM_TASKS_PER_NODE" in env:
            local_world = _tasks_on_first_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env["SLURM_TASKS_PER_NODE"])
        else:
            local_world = world
        _check(rank, world, local_rank, local_world, ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"))
        job_id = env.get("SLURM_JOB_ID")
        if "MASTER_ADDR" in env:
            addr = env["MASTER_ADDR"]
        else:
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            if not nodelist:
                raise ValueError("SLURM task without SLURM_JOB_NODELIST/SLURM_NODELIST; set MASTER_ADDR")
            addr = parse_hostlist(nodelist)[0]
        if "MASTER_PORT" in env:
            port = _int(env, "MASTER_PORT")
        elif job_id is not None:
            port = 20000 + _int(env, "SLURM_JOB_ID") % 20000
        else:
            raise ValueError("SLURM task without SLURM_JOB_ID; set MASTER_PORT")
        return DistEnv(rank, world, local_rank, local_world, addr, port, "slurm", job_id)
    return DistEnv(0, 1, 0, 1, "127.0.0.1", _free_port(), "single", env.get("SLURM_JOB_ID"))


def init_distributed(*, backend: str, device_type: str, tensor_model_parallel_size: int = 1,
                     pipeline_model_parallel_size: int = 1,
                     virtual_pipeline_model_parallel_size: Optional[int] = None,
                     context_parallel_size: int = 1, expert_model_parallel_size: int = 1,
                     expert_tensor_parallel_size: Optional[int] = None, timeout_minutes: int = 10,
                     environ: Optional[Mapping[str, str]] = None) -> DistEnv:
    """Initialise torch.distributed and Megatron-Core's parallel_state for this process."""
    from megatron.core import parallel_state

    env = resolve_dist_env(environ)
    mp = tensor_model_parallel_size * pipeline_model_parallel_size * context_parallel_size
    sizes = (f"--tensor-model-parallel-size {tensor_model_parallel_size} x --pipeline-model-parallel-size "
             f"{pipeline_model_parallel_size} x --context-parallel-size {context_parallel_size} = {mp}")
    if env.world_size == 1 and mp > 1:
        raise ValueError(f"{sizes} needs {mp} processes but this is a single process; launch with "
                         f"`torchrun --nproc-per-node {mp}` or `srun -n {mp}`")
    if env.world_size % mp:
        raise ValueError(f"world size {env.world_size} is not divisible by {sizes}")
    dp = env.world_size // mp
    etp = expert_tensor_parallel_size or tensor_model_parallel_size
    if (dp * context_parallel_size * tensor_model_parallel_size) % (expert_model_parallel_size * etp):
        raise ValueError(f"--expert-model-parallel-size {expert_model_parallel_size} x "
                         f"--expert-tensor-parallel-size {etp} does not divide the "
                         f"{dp * context_parallel_size * tensor_model_parallel_size} ranks of a pipeline stage")
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    if device_type == "cuda":
        torch.cuda.set_device(env.local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend=backend, rank=env.rank, world_size=env.world_size,
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            timeout=timedelta(minutes=timeout_minutes))
    kwargs = dict(tensor_model_parallel_size=tensor_model_parallel_size,
                  pipeline_model_parallel_size=pipeline_model_parallel_size,
                  virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
                  context_parallel_size=context_parallel_size,
                  expert_model_parallel_size=expert_model_parallel_size,
                  expert_tensor_parallel_size=expert_tensor_parallel_size,
                  distributed_timeout_minutes=timeout_minutes)
    accepted = inspect.signature(parallel_state.initialize_model_parallel).parameters
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(**{k: v for k, v in kwargs.items() if k in accepted})
    return env


def set_random_seed(seed: int, *, data_parallel_differs: bool = False) -> None:
    """Megatron-LM seeding: seed + 100 x pipeline rank (+ 10 x data-parallel rank if asked)."""
    from megatron.core import parallel_state, tensor_parallel

    if parallel_state.model_parallel_is_initialized():
        seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
        if data_parallel_differs:
            seed += 10 * parallel_state.get_data_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    """Tear down parallel_state and the process group (idempotent)."""
    try:
        from megatron.core import parallel_state
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
    except ImportError:
        pass
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def print_rank_0(*args, **kwargs) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(*args, **kwargs, flush=True)
