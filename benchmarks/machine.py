"""What every benchmark records about where it ran: CPU model, memory, git state, package versions,
and /proc/<pid>/status fields. Imported by the benchmark scripts (run as `python benchmarks/X.py`,
so this folder is on sys.path)."""

from __future__ import annotations

import platform as pyplatform
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    return pyplatform.processor() or pyplatform.machine()


def mem_total() -> int | None:
    """Total RAM in bytes (None where /proc/meminfo is unreadable)."""
    try:
        with open("/proc/meminfo") as f:
            return int(re.search(r"^MemTotal:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024
    except (OSError, AttributeError):
        return None


def git(*args: str, cwd: Path = REPO) -> str:
    """`git ARGS` output in cwd ("" when git fails: results still get written)."""
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception:  # noqa: BLE001
        return ""


def version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def status_kb(field: str, pid: int | str = "self") -> int:
    """A kB field of /proc/<pid>/status (VmRSS, VmHWM, ...); 0 when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) if m else 0
    except OSError:
        return 0


def describe(packages: dict[str, str], watched: list[str]) -> dict:
    """The machine, the versions of `packages` ({key: distribution}), and the git state of `watched` paths."""
    import os
    status = git("status", "--porcelain", "--", *watched).splitlines()
    return {
        "machine": {
            "cpu_model": cpu_model(),
            "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "cpu_count": os.cpu_count(),
            "memory_bytes": mem_total(),
            "os": f"{pyplatform.system()} {pyplatform.release()}",
        },
        "versions": {"python": pyplatform.python_version(), **{k: version(d) for k, d in packages.items()}},
        "git": {"commit": git("rev-parse", "HEAD"), "watched": watched, "modified": bool(status), "status": status},
    }


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_results(prefix: Path, doc: dict, render) -> tuple[Path, Path]:
    """`prefix.json` (the document) and `prefix.md` (render(doc)), each written whole; returns both paths."""
    import json
    prefix.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = Path(f"{prefix}.json"), Path(f"{prefix}.md")
    _write_atomic(json_path, json.dumps(doc, indent=1) + "\n")
    _write_atomic(md_path, render(doc))
    return json_path, md_path


def rerender(json_path: Path, render, notes: list[str]) -> Path:
    """Add `notes` to a results .json and rewrite it and its .md (render(doc)); returns the .md path."""
    import json
    doc = json.loads(json_path.read_text())
    doc["notes"] = doc.get("notes", []) + [f"Note: {n}" for n in notes]
    _write_atomic(json_path, json.dumps(doc, indent=1) + "\n")
    md = (json_path.with_name(json_path.name[:-len(".json")] + ".md") if json_path.name.endswith(".json")
          else Path(f"{json_path}.md"))
    _write_atomic(md, render(doc))
    return md


# ---------------------------------------------------------------------------------------------
# Fresh rank processes and peak memory (shared by loss.py and train_step.py)
# ---------------------------------------------------------------------------------------------

def fix_mmap_threshold() -> bool:
    """glibc: serve every allocation >= 64 KiB by mmap and return it on free (no dynamic threshold),
    so that RSS follows the bytes actually live instead of what the heap retains."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024))   # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


class PeakMemory:
    """Peak memory of a region of code over what was resident at `start()`.

    CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated at
    the start. CPU: the kernel's peak-RSS mark is reset (/proc/self/clear_refs = 5), VmRSS is read,
    and the peak is max(ru_maxrss, VmHWM): page- and allocator-granular (differences below ~1 MiB
    are noise); `contaminated` when the mark could not be reset and an earlier peak may hide this one.
    """

    def __init__(self, device):
        self.device = device

    def start(self) -> None:
        import resource

        import torch
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.reset = True
        except OSError:
            self.reset = False
        self.before = status_kb("VmRSS") * 1024
        self.maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def stop(self) -> dict:
        """{"extra_bytes", "method_used", ...}: the peak since start() minus the bytes resident then."""
        import resource

        import torch
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return {"extra_bytes": torch.cuda.max_memory_allocated(self.device) - self.before,
                    "before_bytes": self.before, "method_used": "cuda_allocator"}
        peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, status_kb("VmHWM")) * 1024
        out = {"extra_bytes": peak - self.before, "before_bytes": self.before, "rss_before_bytes": self.before,
               "peak_rss_bytes": peak,
               "hwm_reset": self.reset, "method_used": "rss"}
        if not self.reset and self.maxrss0 > self.before:
            out["contaminated"] = True
        return out


def _rank_process(fn, rank: int, world: int, port: int, spec: dict, conn) -> None:
    import os
    import pickle
    import sys
    import traceback
    status = 0
    try:
        malloc_fixed = spec.get("malloc") == "fixed" and fix_mmap_threshold()
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
        result = fn(rank, world, port, spec)
        if isinstance(result, dict) and "malloc" in spec:
            result["malloc_fixed"] = malloc_fixed
        conn.send_bytes(pickle.dumps(("ok", result)))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        status = 1
        try:
            conn.send_bytes(pickle.dumps(("err", traceback.format_exc())))
        except Exception:  # noqa: BLE001
            pass
    finally:
        try:
            import torch
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass
        conn.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def run_ranks(fn, spec: dict, world: int, *, name: str = "job") -> list:
    """Run fn(rank, world, port, spec) in `world` fresh processes (forked on CPU, spawned for CUDA:
    spec["device"]) with the torchrun environment set (MASTER_ADDR/PORT, RANK, WORLD_SIZE, ...);
    spec["malloc"] == "fixed" fixes glibc's mmap threshold first (`fix_mmap_threshold`). Returns
    the results ordered by rank; RuntimeError naming the rank on an exception, a death or
    spec["timeout"] seconds passing (every rank is then killed)."""
    import multiprocessing as mp
    import pickle
    import time
    from multiprocessing.connection import wait

    from megatron_rpt.distributed import free_port
    ctx = mp.get_context("fork" if spec.get("device", "cpu") == "cpu" else "spawn")
    port = free_port()
    procs, conns = [], {}
    for rank in range(world):
        parent_end, child_end = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_rank_process, args=(fn, rank, world, port, spec, child_end))
        p.start()
        child_end.close()
        procs.append(p)
        conns[parent_end] = rank
    results, error = {}, None
    deadline = time.monotonic() + spec["timeout"]
    try:
        pending = dict(conns)
        while pending and error is None:
            left = deadline - time.monotonic()
            if left <= 0:
                error = f"timeout after {spec['timeout']} s"
                break
            for c in wait(list(pending), timeout=left):
                rank = pending.pop(c)
                try:
                    kind, value = pickle.loads(c.recv_bytes())
                except EOFError:
                    error = f"rank {rank} died (exit code {procs[rank].exitcode})"
                    break
                if kind == "err":
                    error = f"rank {rank} raised:\n{value}"
                    break
                results[rank] = value
    finally:
        for p in procs:
            if error is not None and p.is_alive():
                p.kill()
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
        for c in conns:
            c.close()
    if error is not None:
        raise RuntimeError(f"{name} failed: {error}")
    return [results[r] for r in range(world)]
