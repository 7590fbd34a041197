"""Process-group bootstrap: launcher environment -> torch.distributed + Megatron-Core parallel_state.

This module owns: reading the launcher's environment (torchrun, SLURM `srun`, or nothing),
expanding SLURM hostlists without `scontrol`, creating the default process group, initialising
`megatron.core.parallel_state`, Megatron-LM-style seeding, teardown, and `print_rank_0`.

Launcher precedence (first match wins):

1. **torchrun** - RANK and WORLD_SIZE are set (LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and
   MASTER_PORT come from torchrun too). It wins over SLURM because `srun torchrun ...` (one
   torchrun agent per node) leaves SLURM_* of the agent's task in every worker's environment.
   Only one of RANK / WORLD_SIZE set is an error.
2. **SLURM srun task** - SLURM_PROCID, SLURM_NTASKS and a *task* step id (SLURM_STEP_ID, or the
   older SLURM_STEPID) are all set. A task step id is a plain integer below 0xfffffff0 (SLURM's
   SLURM_MAX_NORMAL_STEP_ID): the batch script (`sbatch`'s own shell: "batch" / 0xfffffffb, older
   SLURM 0xfffffffe), the extern step and the `salloc` interactive step carry either a name or
   one of SLURM's reserved ids above it, and they are a single process even though SLURM_NTASKS
   may say 8: a Python process started in them must not wait for 7 peers that `srun` never
   launched. `salloc` shells have no SLURM_PROCID at all.
   rank = SLURM_PROCID, world = SLURM_NTASKS, local rank = SLURM_LOCALID; tasks on this node from
   SLURM_STEP_TASKS_PER_NODE, else SLURM_TASKS_PER_NODE (both like "4(x2),3", indexed by
   SLURM_NODEID), else SLURM_NTASKS_PER_NODE. The step-level value comes first because
   SLURM_NTASKS_PER_NODE is inherited unchanged from `sbatch --ntasks-per-node` by an
   `srun -n` that launches fewer tasks.
   MASTER_ADDR = first host of SLURM_STEP_NODELIST / SLURM_JOB_NODELIST / SLURM_NODELIST (rank 0
   runs there under SLURM's default block distribution); MASTER_PORT = 20000 + job id % 20000 so
   that concurrent jobs sharing a node do not collide. Explicit MASTER_ADDR / MASTER_PORT win
   (needed when two `srun` steps of one job run at the same time on the same node).
3. **single** process - rank 0 of 1 on 127.0.0.1 and a free port.

Every inconsistent or non-integer value raises ValueError naming the variable.
"""

from __future__ import annotations

import inspect
import os
import random
import re
import socket
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, Mapping, Optional

import numpy as np
import torch

__all__ = ["DistEnv", "parse_hostlist", "resolve_dist_env", "init_distributed", "set_random_seed",
           "destroy_distributed", "print_rank_0"]


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, as the launcher described it."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"
    job_id: Optional[str] = None


# ---------------------------------------------------------------------------------------------
# SLURM hostlists
# ---------------------------------------------------------------------------------------------

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
# SLURM refuses absurd ranges too; without a cap "n[0-999999999]" would exhaust memory.
_MAX_HOSTS = 1 << 20


def _split_top_level(expr: str) -> list[str]:
    """Split a hostlist on the commas that separate hosts (not those inside brackets)."""
    parts: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in expr:
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"hostlist {expr!r}: nested '[' is not a SLURM hostlist")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"hostlist {expr!r}: unbalanced ']' without '['")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise ValueError(f"hostlist {expr!r}: unbalanced '[' without ']'")
    parts.append("".join(cur))
    return parts


def _expand_ranges(body: str, expr: str) -> list[str]:
    """'01-03,07' -> ['01', '02', '03', '07']; zero padding follows the lower bound as in SLURM."""
    out: list[str] = []
    for item in body.split(","):
        m = _RANGE.match(item.strip())
        if not m:
            raise ValueError(f"hostlist {expr!r}: bad range {item!r} inside brackets "
                             "(expected N or N-M with decimal digits)")
        lo, hi = m.group(1), m.group(2)
        if hi is None:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"hostlist {expr!r}: descending range {item!r}")
        if int(hi) - int(lo) + 1 > _MAX_HOSTS:
            raise ValueError(f"hostlist {expr!r}: range {item!r} has more than {_MAX_HOSTS} hosts")
        width = len(lo)  # "08-10" -> 2 digits; "8-11" -> width 1, i.e. no padding
        out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    return out


def _expand_host(pattern: str, expr: str) -> list[str]:
    """Cartesian product of the bracket groups of one host pattern, leftmost group outermost."""
    hosts = [""]
    pos = 0
    for m in re.finditer(r"\[([^\]]*)\]", pattern):
        prefix = pattern[pos:m.start()]
        hosts = [h + prefix + r for h in hosts for r in _expand_ranges(m.group(1), expr)]
        if len(hosts) > _MAX_HOSTS:
            raise ValueError(f"hostlist {expr!r}: expands to more than {_MAX_HOSTS} hosts")
        pos = m.end()
    return [h + pattern[pos:] for h in hosts]


def parse_hostlist(expr: str) -> list[str]:
    """Expand a SLURM hostlist expression without `scontrol`, in SLURM's order.

    "gpu[01-03,07],login1" -> gpu01 gpu02 gpu03 gpu07 login1 (zero padding kept); suffixes
    ("c[08-10]-ib") and several bracket groups ("rack[1-2]-node[1-2]", cartesian product) work.
    Malformed input (empty, unbalanced or nested brackets, bad or descending ranges, empty host
    names) raises ValueError naming the expression.
    """
    if not isinstance(expr, str) or not expr.strip():
        raise ValueError(f"hostlist {expr!r} is empty")
    hosts: list[str] = []
    for part in _split_top_level(expr.strip()):
        part = part.strip()
        if not part:
            raise ValueError(f"hostlist {expr!r}: empty host name (stray comma)")
        if any(ch.isspace() for ch in part):
            raise ValueError(f"hostlist {expr!r}: whitespace inside host name {part!r}")
        hosts.extend(_expand_host(part, expr))
        if len(hosts) > _MAX_HOSTS:
            raise ValueError(f"hostlist {expr!r}: expands to more than {_MAX_HOSTS} hosts")
    return hosts


# ---------------------------------------------------------------------------------------------
# Launcher environment
# ---------------------------------------------------------------------------------------------

_INT = re.compile(r"[+-]?[0-9]+")


def _int(env: Mapping[str, str], name: str) -> int:
    value = env.get(name)
    # Stricter than int(): "1_000" or non-ASCII digits in a launcher variable mean a broken script.
    if value is None or not _INT.fullmatch(value.strip()):
        raise ValueError(f"environment variable {name}={value!r} is not an integer")
    return int(value)


def _port(env: Mapping[str, str], name: str) -> int:
    port = _int(env, name)
    if not 0 < port < 65536:
        raise ValueError(f"environment variable {name}={port} is not a TCP port (1-65535)")
    return port


def _parse_tasks_per_node(spec: str, name: str) -> list[int]:
    """SLURM's compressed per-node task counts: '4(x2),3' -> [4, 4, 3]."""
    counts: list[int] = []
    for item in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not m or int(m.group(1)) < 1 or (m.group(2) is not None and int(m.group(2)) < 1):
            raise ValueError(f"environment variable {name}={spec!r} is malformed "
                             "(expected e.g. '4(x2),3')")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for single-process groups and tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _is_srun_task(env: Mapping[str, str]) -> bool:
    """True for a task launched by `srun`; False for the sbatch batch script, extern/interactive
    steps and salloc shells (see the module docstring for why)."""
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID"))
    if "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env or step is None:
        return False
    step = step.strip()
    # SLURM's reserved step ids (batch, extern, interactive, pending) all lie above
    # SLURM_MAX_NORMAL_STEP_ID = 0xfffffff0, in old and new SLURM releases alike.
    return re.fullmatch(r"[0-9]+", step) is not None and int(step) < 0xFFFFFFF0


def _check_ranks(rank: int, world: int, local_rank: int, local_world: int,
                 names: tuple[str, str, str, str]) -> None:
    n_rank, n_world, n_local, n_local_world = names
    if world < 1:
        raise ValueError(f"environment variable {n_world}={world} must be >= 1")
    if not 0 <= rank < world:
        raise ValueError(f"environment variable {n_rank}={rank} is out of range for {n_world}={world}")
    if not 1 <= local_world <= world:
        raise ValueError(f"environment variable {n_local_world}={local_world} (tasks on this node) "
                         f"must be between 1 and {n_world}={world}")
    if not 0 <= local_rank < local_world:
        raise ValueError(f"environment variable {n_local}={local_rank} is out of range for "
                         f"{local_world} tasks on this node ({n_local_world})")


def _torchrun_env(env: Mapping[str, str]) -> DistEnv:
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
    local_world = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world
    _check_ranks(rank, world, local_rank, local_world,
                 ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"))
    if world > 1:
        # Without them every rank would pick its own address/port and wait forever.
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not env.get(name):
                raise ValueError(f"RANK/WORLD_SIZE are set (world size {world}) but {name} is not; "
                                 "launch with torchrun or set MASTER_ADDR and MASTER_PORT")
    addr = env.get("MASTER_ADDR") or "127.0.0.1"
    port = _port(env, "MASTER_PORT") if env.get("MASTER_PORT") else free_port()
    return DistEnv(rank, world, local_rank, local_world, addr, port, "torchrun",
                   env.get("TORCHELASTIC_RUN_ID"))


def _slurm_env(env: Mapping[str, str]) -> DistEnv:
    rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
    local_rank = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
    spec_name = next((n for n in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE") if env.get(n)), None)
    if spec_name is not None:
        counts = _parse_tasks_per_node(env[spec_name], spec_name)
        if "SLURM_NODEID" in env:
            node = _int(env, "SLURM_NODEID")
            if not 0 <= node < len(counts):
                raise ValueError(f"environment variable SLURM_NODEID={node} is out of range for "
                                 f"{spec_name}={env[spec_name]!r} ({len(counts)} nodes)")
        else:  # block distribution: ranks fill node 0 first
            node, first = 0, 0
            while node < len(counts) - 1 and rank >= first + counts[node]:
                first += counts[node]
                node += 1
        local_world, local_world_name = counts[node], spec_name
    elif "SLURM_NTASKS_PER_NODE" in env:
        local_world, local_world_name = _int(env, "SLURM_NTASKS_PER_NODE"), "SLURM_NTASKS_PER_NODE"
    else:
        local_world, local_world_name = world, "SLURM_NTASKS"
    _check_ranks(rank, world, local_rank, local_world,
                 ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", local_world_name))

    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if env.get("MASTER_ADDR"):
        addr = env["MASTER_ADDR"]
    else:
        name = next((n for n in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                     if env.get(n)), None)
        if name is None:
            raise ValueError("SLURM task without SLURM_JOB_NODELIST/SLURM_NODELIST: cannot tell the "
                             "master host; set MASTER_ADDR")
        addr = parse_hostlist(env[name])[0]
    if env.get("MASTER_PORT"):
        port = _port(env, "MASTER_PORT")
    elif job_id is not None:
        port = 20000 + _int({"SLURM_JOB_ID": job_id}, "SLURM_JOB_ID") % 20000
    else:
        raise ValueError("SLURM task without SLURM_JOB_ID: cannot derive MASTER_PORT; set MASTER_PORT")
    return DistEnv(rank, world, local_rank, local_world, addr, port, "slurm", job_id)


def resolve_dist_env(environ: Optional[Mapping[str, str]] = None) -> DistEnv:
    """Rank, world size and rendezvous address from the launcher's environment.

    `environ` defaults to os.environ. Precedence torchrun > srun task > single process; see the
    module docstring for the exact rules. Raises ValueError naming the offending variable.
    """
    env = os.environ if environ is None else environ
    has_rank, has_world = "RANK" in env, "WORLD_SIZE" in env
    if has_rank and has_world:
        return _torchrun_env(env)
    if has_rank != has_world:
        missing = "WORLD_SIZE" if has_rank else "RANK"
        present = "RANK" if has_rank else "WORLD_SIZE"
        raise ValueError(f"environment variable {present} is set but {missing} is not; set both "
                         "(torchrun does) or neither")
    if _is_srun_task(env):
        return _slurm_env(env)
    return DistEnv(0, 1, 0, 1, "127.0.0.1", free_port(), "single",
                   env.get("SLURM_JOB_ID") or None)


def launch_world_size(environ: Optional[Mapping[str, str]] = None) -> tuple[int, str]:
    """(world size, where it came from) as a launch would see it, without joining any job: WORLD_SIZE
    (torchrun), else SLURM_NTASKS (srun in an allocation), else 1. For checks on a login node."""
    env = os.environ if environ is None else environ
    for name, launcher in (("WORLD_SIZE", "torchrun"), ("SLURM_NTASKS", "slurm")):
        if env.get(name):
            value = _int(env, name)
            if value < 1:
                raise ValueError(f"environment variable {name}={value}: expected a world size >= 1")
            return value, f"{launcher} ({name}={value})"
    return 1, "single process (no WORLD_SIZE or SLURM_NTASKS)"


# ---------------------------------------------------------------------------------------------
# Process groups
# ---------------------------------------------------------------------------------------------

_FLAGS = {
    "tensor_model_parallel_size": "--tensor-model-parallel-size",
    "pipeline_model_parallel_size": "--pipeline-model-parallel-size",
    "virtual_pipeline_model_parallel_size": "--virtual-pipeline-model-parallel-size",
    "context_parallel_size": "--context-parallel-size",
    "expert_model_parallel_size": "--expert-model-parallel-size",
    "expert_tensor_parallel_size": "--expert-tensor-parallel-size",
    "distributed_timeout_minutes": "--distributed-timeout-minutes",
}
# Keywords that may be dropped when this Megatron-Core's initialize_model_parallel lacks them:
# their value only matters to code that takes it from ModelParallelConfig in newer releases.
_DROPPABLE = {"virtual_pipeline_model_parallel_size", "distributed_timeout_minutes"}


def _parallel_state_kwargs(fn: Any, wanted: dict[str, Any]) -> dict[str, Any]:
    """Keep the keywords this Megatron-Core accepts; refuse to silently drop a non-default size."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(wanted)
    kwargs: dict[str, Any] = {}
    for name, value in wanted.items():
        if name in params:
            kwargs[name] = value
        elif name not in _DROPPABLE and value not in (None, 1):
            raise RuntimeError(f"{_FLAGS[name]} {value}: megatron.core.parallel_state."
                               f"initialize_model_parallel of this Megatron-Core has no `{name}` "
                               "argument; use a Megatron-Core version that supports it")
    return kwargs


def _check_sizes(world_size: int, tp: int, pp: int, vp: Optional[int], cp: int, ep: int,
                 etp: Optional[int]) -> None:
    for name, value in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp),
                        ("context_parallel_size", cp), ("expert_model_parallel_size", ep),
                        ("virtual_pipeline_model_parallel_size", vp),
                        ("expert_tensor_parallel_size", etp)):
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{_FLAGS[name]} {value!r} must be a positive integer")
    mp = tp * pp * cp
    sizes = (f"--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size {pp} x "
             f"--context-parallel-size {cp} = {mp}")
    if world_size == 1 and mp > 1:
        raise ValueError(f"{sizes} needs {mp} processes but this is a single process; launch with "
                         f"`torchrun --nproc-per-node {mp}` or `srun -n {mp}`")
    if world_size % mp:
        raise ValueError(f"world size {world_size} is not divisible by {sizes}; launch a multiple of "
                         f"{mp} processes or change these sizes")
    # Megatron-Core lays the expert grid over the same ranks as one pipeline stage's TPxCPxDP.
    etp_eff = tp if etp is None else etp
    stage = world_size // pp
    if stage % (ep * etp_eff):
        raise ValueError(f"--expert-model-parallel-size {ep} x --expert-tensor-parallel-size {etp_eff} "
                         f"= {ep * etp_eff} does not divide the {stage} ranks of a pipeline stage "
                         f"(world size {world_size} / --pipeline-model-parallel-size {pp})")


def init_distributed(*, backend: str, device_type: str, tensor_model_parallel_size: int = 1,
                     pipeline_model_parallel_size: int = 1,
                     virtual_pipeline_model_parallel_size: Optional[int] = None,
                     context_parallel_size: int = 1, expert_model_parallel_size: int = 1,
                     expert_tensor_parallel_size: Optional[int] = None, timeout_minutes: int = 10,
                     environ: Optional[Mapping[str, str]] = None) -> DistEnv:
    """Create the default process group (unless one exists) and Megatron-Core's parallel groups.

    Sizes are validated against the world size before anything is created, with messages naming
    the Megatron-LM flags. On CUDA the device is set to the local rank first (NCCL needs it).
    If a process group already exists (e.g. a test harness made it), its rank and world size are
    used and must agree with the launcher's. parallel_state is re-initialised if already set up.
    """
    from megatron.core import parallel_state

    env = resolve_dist_env(environ)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if env.launcher != "single" and (env.rank, env.world_size) != (rank, world):
            raise ValueError(f"torch.distributed is already initialised as rank {rank} of {world} but the "
                             f"{env.launcher} environment says rank {env.rank} of {env.world_size}")
        env = replace(env, rank=rank, world_size=world)
    _check_sizes(env.world_size, tensor_model_parallel_size, pipeline_model_parallel_size,
                 virtual_pipeline_model_parallel_size, context_parallel_size,
                 expert_model_parallel_size, expert_tensor_parallel_size)
    if timeout_minutes <= 0:
        raise ValueError(f"--distributed-timeout-minutes {timeout_minutes} must be positive")

    # Overwritten, not setdefault: libraries that rendezvous via env:// later (and users' code)
    # must see what this process group actually used, not a stale value of a single-process run.
    os.environ["MASTER_ADDR"] = env.master_addr
    os.environ["MASTER_PORT"] = str(env.master_port)
    if device_type == "cuda":
        count = torch.cuda.device_count()
        if env.local_rank >= count:
            raise ValueError(f"local rank {env.local_rank} ({env.launcher}) needs GPU {env.local_rank} "
                             f"but only {count} are visible; start at most {count} tasks per node")
        torch.cuda.set_device(env.local_rank)
    if not torch.distributed.is_initialized():
        host = f"[{env.master_addr}]" if ":" in env.master_addr else env.master_addr  # IPv6
        torch.distributed.init_process_group(
            backend=backend, rank=env.rank, world_size=env.world_size,
            init_method=f"tcp://{host}:{env.master_port}", timeout=timedelta(minutes=timeout_minutes))

    kwargs = _parallel_state_kwargs(parallel_state.initialize_model_parallel, dict(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
        expert_tensor_parallel_size=expert_tensor_parallel_size,
        distributed_timeout_minutes=timeout_minutes))
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(**kwargs)
    return env


def set_random_seed(seed: int, *, data_parallel_differs: bool = False) -> None:
    """Seed python, numpy, torch and Megatron-Core's tensor-parallel RNG tracker.

    Megatron-LM convention: seed + 100 x pipeline rank (+ 10 x data-parallel rank when
    `data_parallel_differs`), so pipeline stages initialise different layers differently while TP
    ranks share the default stream. Before parallel_state exists all ranks count as 0. On CPU the
    tracker needs `megatron_rpt.platform.setup_platform()` to have been called.
    """
    from megatron.core import parallel_state, tensor_parallel

    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--seed {seed!r} must be a non-negative integer")
    initialized = parallel_state.model_parallel_is_initialized()
    if initialized:
        seed += 100 * parallel_state.get_pipeline_model_parallel_rank()
        if data_parallel_differs:
            seed += 10 * parallel_state.get_data_parallel_rank()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    ranks: dict[str, int] = {}
    if not initialized:  # upstream asks parallel_state for these ranks, which would assert
        accepted = inspect.signature(tensor_parallel.model_parallel_cuda_manual_seed).parameters
        ranks = {k: 0 for k in ("tp_rank", "ep_rank", "etp_rank") if k in accepted}
    try:
        tensor_parallel.model_parallel_cuda_manual_seed(seed, **ranks)
    except (RuntimeError, AssertionError, AttributeError) as exc:
        if torch.cuda.is_available():
            raise
        raise RuntimeError("seeding Megatron-Core's tensor-parallel RNG tracker on CPU needs the "
                           "platform layer: call megatron_rpt.platform.setup_platform() first") from exc


def destroy_distributed() -> None:
    """Tear down parallel_state and the default process group; safe to call repeatedly."""
    try:
        from megatron.core import parallel_state
    except ImportError:
        parallel_state = None
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def exit_without_teardown(code: int) -> None:
    """End a process that ran a 1-rank gloo group, once its outputs are complete (written, renamed,
    fsynced), without interpreter teardown. After the group is destroyed its C++ worker threads
    (pt_gloo_runloop, gloo_tcp_loop) outlive every Python reference, and libtorch's static
    destructors at exit aborted the process ("terminate called without an active exception", exit
    134 / signal 6) in ~1 of 12 runs of a finished conversion (torch 2.13, gloo)."""
    import sys
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def max_over_ranks(values: list, device: Any, group: Any = None) -> list:
    """Element-wise maximum of per-rank integers over `group` (None: the world), one all-reduce: how
    ranks agree on a count, a length or a flag (OR of 0/1) so that their collectives match."""
    t = torch.tensor([int(v) for v in values], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=group)
    return t.tolist()


def print_rank_0(*args: Any, **kwargs: Any) -> None:
    """print(..., flush=True) on global rank 0, or anywhere before a process group exists."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
            or torch.distributed.get_rank() == 0:
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)
