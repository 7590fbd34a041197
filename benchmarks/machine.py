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
