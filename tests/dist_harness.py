"""Multi-rank test harness: run a function on N forked gloo ranks and return their results.

Forking (not spawning) keeps a 2-rank run well under a second: torch and megatron.core are
imported once in the pytest process and inherited. The parent never initialises a process group
(a forked child would inherit a broken one); it installs the CPU platform layer before forking so
every worker starts with the same patches and the device mode on its main thread.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import wait
from typing import Any

import torch

from megatron_rpt.distributed import free_port

__all__ = ["run_ranks", "RankError"]


class RankError(RuntimeError):
    """A worker raised (message: its rank and full traceback) or died / timed out."""


def _worker(rank: int, world_size: int, port: int, timeout: float, fn: Callable, args: tuple, kwargs: dict, conn: Any) -> None:
    status = 0
    try:
        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_WORLD_SIZE=str(world_size),
        )
        torch.set_num_threads(1)  # N ranks share 2 cores; oversubscription costs more than it gives
        from megatron_rpt.platform.compat.device_mode import ensure_device_mode

        ensure_device_mode()
        torch.distributed.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout)
        )
        result = fn(rank, world_size, *args, **kwargs)
        # Plain pickle by value: Connection.send would use torch's shared-memory reducers, whose
        # file descriptors die with the worker once it exits.
        conn.send_bytes(pickle.dumps(("ok", result)))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        status = 1
        try:
            conn.send_bytes(pickle.dumps(("err", traceback.format_exc())))
        except Exception:  # noqa: BLE001 - unpicklable or broken pipe: the parent sees the exit
            pass
    finally:
        try:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
        except Exception:  # noqa: BLE001
            pass
        try:
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass
        # Helper processes the worker started (e.g. dist-checkpoint's multiprocessing Manager) would
        # outlive os._exit: end them explicitly.
        for child in mp.active_children():
            child.terminate()
            child.join(timeout=5)
        try:  # and any process they forked in turn (not tracked by multiprocessing)
            import psutil

            for child in psutil.Process().children(recursive=True):
                child.kill()
        except Exception:  # noqa: BLE001
            pass
        conn.close()
        sys.stdout.flush()
        sys.stderr.flush()
        # Skip the parent's atexit handlers and pytest's teardown inherited through fork.
        os._exit(status)


def _kill_tree(proc: Any) -> None:
    """SIGKILL a worker and the processes it started (a killed worker cannot end its own
    helpers, e.g. dist-checkpoint's Manager server, which would otherwise be orphaned)."""
    try:
        import psutil

        children = psutil.Process(proc.pid).children(recursive=True)
    except Exception:  # noqa: BLE001 - already gone, or psutil missing
        children = []
    proc.kill()
    for child in children:
        try:
            child.kill()
        except Exception:  # noqa: BLE001
            pass


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 180.0, **kwargs: Any) -> list:
    """Fork `world_size` gloo ranks, call fn(rank, world_size, *args, **kwargs) in each, return the
    results ordered by rank.

    Each worker: torch.set_num_threads(1); MASTER_ADDR=127.0.0.1 and a free port; gloo process
    group; afterwards megatron.core.parallel_state and the process group are destroyed. If a rank
    raises, RankError carries that rank's traceback (the first to fail) and all workers are killed;
    likewise on timeout or when a worker dies without reporting.
    """
    from megatron_rpt.platform import setup_platform

    setup_platform(force_cpu=True)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        raise RuntimeError("run_ranks: the parent process must not initialise a process group")
    ctx = mp.get_context("fork")
    port = free_port()
    procs, conns = [], {}
    for rank in range(world_size):
        parent_end, child_end = ctx.Pipe(duplex=False)
        p = ctx.Process(
            target=_worker,
            args=(rank, world_size, port, timeout, fn, args, kwargs, child_end),
            daemon=False,  # workers may start processes of their own (dist-checkpoint writers)
        )
        p.start()
        child_end.close()
        procs.append(p)
        conns[parent_end] = rank
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    error: str | None = None
    try:
        pending = dict(conns)
        sentinels = {p.sentinel: r for r, p in enumerate(procs)}
        while pending and error is None:
            left = deadline - time.monotonic()
            if left <= 0:
                error = f"timeout after {timeout:.0f} s; ranks without a result: {sorted(pending.values())}"
                break
            ready = wait(list(pending) + list(sentinels), timeout=left)
            for obj in ready:
                if obj in pending:
                    rank = pending.pop(obj)
                    try:
                        kind, value = pickle.loads(obj.recv_bytes())
                    except EOFError:
                        error = f"rank {rank} exited without a result (exit code {procs[rank].exitcode})"
                        break
                    if kind == "err":
                        error = f"rank {rank} raised:\n{value}"
                        break
                    results[rank] = value
                elif obj in sentinels:
                    rank = sentinels.pop(obj)
                    # A result may still be buffered in its pipe: read it before judging.
                    conn = next((c for c, r in pending.items() if r == rank), None)
                    if conn is not None and not conn.poll(0.5):
                        error = f"rank {rank} died without a result (exit code {procs[rank].exitcode})"
                        break
    finally:
        for p in procs:
            if error is not None and p.is_alive():
                _kill_tree(p)
            p.join(timeout=10)
            if p.is_alive():
                _kill_tree(p)
                p.join()
        for c in conns:
            c.close()
    if error is not None:
        raise RankError(error)
    return [results[r] for r in range(world_size)]


def forked(test: Callable) -> Callable:
    """Decorator: run a test's body in one forked rank (`run_ranks(..., 1)`), so that its torch math
    never runs in the pytest process (an OpenMP pool started there hangs the ranks forked later by
    other tests). Pytest still sees the test's own signature (parameters, fixtures)."""
    import functools

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        run_ranks(lambda rank, world: test(*args, **kwargs), 1)
    return run

