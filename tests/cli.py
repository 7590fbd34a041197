"""Run a command-line entry point as users run it, forked from the pytest process.

`run_cli(target, *args)` behaves like `subprocess.run([sys.executable, target, *args])` (target: a
script path such as "tools/convert_checkpoint.py", "-m module.name", or "-c" followed by code) and,
with `nproc > 1`, like `torchrun --standalone --nproc-per-node N target ...`: the same argv, the
same environment variables a rank sees under torchrun (RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, TORCHELASTIC_RUN_ID), all ranks' output merged into one
stdout and one stderr, a failed rank ending its peers, the exit code of the first rank to fail.

What it saves: a fresh interpreter spends 5-10 s of a 2-core machine importing torch, Megatron-Core
and transformers before the tool starts (torchrun adds its own start-up per run). Here they are
imported once (`warm_up`) and each run is a fork: the entry point's `__main__` code runs in a child
process with its own stdout/stderr files, working directory, environment and argv, and exits with
os._exit (neither pytest's atexit handlers nor its output capture are inherited).

Rules that keep forking safe: the pytest process never initialises a process group nor runs torch
math before forking (an OpenMP pool does not survive fork; tests/dist_harness.py has the same
rule), and the CPU platform layer is installed before the fork, as in tests/dist_harness.py. Tests
about processes themselves (signals, SIGKILL, memory of a fresh interpreter, SLURM) keep real
subprocesses.
"""

from __future__ import annotations

import importlib
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional, Sequence

from megatron_rpt.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
_WARM = False


def warm_up() -> None:
    """Import what the entry points import (once per pytest process), CPU platform layer first."""
    global _WARM
    if _WARM:
        return
    from megatron_rpt.platform import setup_platform
    from megatron_rpt.platform.messages import quiet_megatron_core_backend_warnings
    quiet_megatron_core_backend_warnings()   # Megatron-Core's "no Apex/TE" notices fire at import
    setup_platform(force_cpu=True)
    import megatron_rpt.convert.checkpoint  # noqa: F401
    import megatron_rpt.inference.external  # noqa: F401
    import megatron_rpt.inference.megatron_engine  # noqa: F401
    import megatron_rpt.pretrain  # noqa: F401
    import megatron_rpt.rpt.tasks  # noqa: F401
    import megatron_rpt.train_rpt  # noqa: F401
    for name in ("megatron.core", "megatron.core.models.gpt", "megatron.core.models.gpt.gpt_layer_specs",
                 "megatron.core.distributed", "megatron.core.optimizer", "megatron.core.dist_checkpointing",
                 "megatron.core.pipeline_parallel", "megatron.core.datasets.gpt_dataset",
                 "megatron.core.datasets.blended_megatron_dataset_builder",
                 "megatron.core.inference.text_generation_controllers.text_generation_controller",
                 "megatron_rpt.checkpoint.sharded", "megatron_rpt.training.checkpointing", "megatron_rpt.training.loop", "megatron_rpt.rpt.loop"):
        try:   # megatron_rpt imports Megatron-Core lazily, inside functions
            importlib.import_module(name)
        except ImportError:   # a module another megatron-core version lacks: the child imports what it needs
            pass
    import transformers
    for name in ("LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "AutoTokenizer"):
        getattr(transformers, name)   # resolve transformers' lazy modules now, not in every child
    _WARM = True


def _child(target: str, args: Sequence[str], env: dict, cwd: Path, out: int, err: int) -> None:
    code = 1
    try:
        os.setpgid(0, 0)   # one process group per rank: the parent ends whatever it started
        os.dup2(out, 1)
        os.dup2(err, 2)
        sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
        sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
        os.environ.clear()
        os.environ.update(env)
        # The pytest process may have used the tokenizers library's thread pool: a forked child must not.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.chdir(cwd)
        import faulthandler
        import logging
        import warnings
        faulthandler.enable(sys.stderr)
        logging.root.handlers.clear()   # pytest's capture handlers: the tool's logging goes to its stderr
        logging.root.setLevel(logging.WARNING)
        warnings.resetwarnings()
        if env.get("PYTHONWARNINGS") == "ignore":
            warnings.simplefilter("ignore")
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        try:
            if target == "-c":   # python -c CODE ARGS: sys.path starts with the working directory
                sys.argv = ["-c", *args[1:]]
                sys.path.insert(0, "")
                exec(compile(args[0], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
            elif target.startswith("-m "):
                sys.argv = [target[3:], *args]
                sys.path.insert(0, str(cwd))
                sys.modules.pop(target[3:], None)   # imported by warm_up; runs afresh as __main__
                runpy.run_module(target[3:], run_name="__main__", alter_sys=True)
            else:   # python path/to/script.py ARGS: sys.path starts with the script's folder
                sys.argv = [target, *args]
                sys.path.insert(0, str((cwd / target).parent))
                runpy.run_path(target, run_name="__main__")
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:  # noqa: BLE001 - printed as the interpreter would
            traceback.print_exc()
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _kill_group(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Running:
    """A started `start_cli` run; `finish()` waits for it and returns the CompletedProcess."""

    def __init__(self, target: str, argv: list[str], nproc: int, env: dict, cwd: Path, timeout: float):
        self.args = [target, *argv]
        self._out, self._err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        self._deadline, self._timeout = time.monotonic() + timeout, timeout
        if nproc > 1:
            port = free_port()
            env = dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(nproc),
                       LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", TORCHELASTIC_RUN_ID=f"cli-{port}")
        sys.stdout.flush()
        sys.stderr.flush()
        self.pids = []
        for rank in range(nproc):
            env_r = dict(env, RANK=str(rank), LOCAL_RANK=str(rank)) if nproc > 1 else env
            pid = os.fork()
            if pid == 0:
                _child(target, argv, env_r, Path(cwd), self._out.fileno(), self._err.fileno())
            self.pids.append(pid)
        self._result: Optional[subprocess.CompletedProcess] = None

    def kill(self) -> None:
        """End every rank (and what it started) now; finish() then reports the signal."""
        for pid in self.pids:
            _kill_group(pid)

    def finish(self, check: bool = False) -> subprocess.CompletedProcess:
        if self._result is None:
            self._result = self._wait()
        if check and self._result.returncode != 0:
            r = self._result
            raise AssertionError(f"{' '.join(r.args)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        return self._result

    def _wait(self) -> subprocess.CompletedProcess:
        codes: dict[int, int] = {}
        failed_at, first_failure = None, 0
        try:
            while len(codes) < len(self.pids):
                for pid in self.pids:
                    if pid in codes:
                        continue
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done:
                        codes[pid] = os.waitstatus_to_exitcode(status)
                        if codes[pid] != 0 and failed_at is None:
                            failed_at, first_failure = time.monotonic(), codes[pid]
                now = time.monotonic()
                if now > self._deadline:
                    raise subprocess.TimeoutExpired(self.args, self._timeout)
                if failed_at is not None and now - failed_at > 1:   # as torchrun: a failed rank ends its peers
                    self.kill()
                time.sleep(0.02)
        finally:
            for pid in self.pids:
                _kill_group(pid)   # the rank's leftovers (e.g. checkpoint writer processes)
                if pid not in codes:
                    os.waitpid(pid, 0)
        outputs = []
        for f in (self._out, self._err):
            f.seek(0)
            outputs.append(f.read().decode("utf-8", "backslashreplace"))
            f.close()
        return subprocess.CompletedProcess(self.args, first_failure, *outputs)


def start_cli(target: str, *args, nproc: int = 1, env: Optional[dict] = None, cwd: Path = ROOT,
              timeout: float = 600) -> Running:
    """Start `target` with `args` (module docstring) and return at once; see `run_cli`."""
    warm_up()
    return Running(target, [str(a) for a in args], nproc, dict(os.environ if env is None else env), cwd, timeout)


def run_cli(target: str, *args, nproc: int = 1, env: Optional[dict] = None, cwd: Path = ROOT,
            timeout: float = 600, check: bool = False) -> subprocess.CompletedProcess:
    """Run `target` with `args` to the end (module docstring): a CompletedProcess with text stdout
    and stderr. `env`: the whole environment (default: this process's); `check`: AssertionError
    with the output tail on a non-zero exit."""
    return start_cli(target, *args, nproc=nproc, env=env, cwd=cwd, timeout=timeout).finish(check=check)


def _split_python_argv(argv: Sequence[str]) -> tuple[str, list[str], int]:
    """[sys.executable, ...] as a test would pass it to subprocess -> (target, args, nproc).
    Understands `-c CODE ...`, `-m MODULE ...`, `SCRIPT ...` and `-m torch.distributed.run
    [--standalone] --nproc-per-node N (-m MODULE | SCRIPT) ...`."""
    argv = [str(a) for a in argv]
    if not argv or argv[0] != sys.executable:
        raise ValueError(f"not a python command line: {argv[:3]}")
    rest, nproc = argv[1:], 1
    if rest[:2] == ["-m", "torch.distributed.run"]:
        rest = rest[2:]
        while rest and rest[0].startswith("--"):
            flag = rest.pop(0)
            if flag in ("--nproc-per-node", "--nproc_per_node"):
                nproc = int(rest.pop(0))
            elif flag.startswith(("--nproc-per-node=", "--nproc_per_node=")):
                nproc = int(flag.split("=", 1)[1])
            elif flag != "--standalone":
                raise ValueError(f"torchrun flag {flag} is not supported by tests/cli.py")
    if rest[0] == "-c":
        return "-c", rest[1:], nproc
    if rest[0] == "-m":
        return f"-m {rest[1]}", rest[2:], nproc
    return rest[0], rest[1:], nproc


def start_python(argv: Sequence[str], *, env: Optional[dict] = None, timeout: float = 600) -> Running:
    """`start_cli` for a full `[sys.executable, ...]` command line (see `_split_python_argv`)."""
    target, args, nproc = _split_python_argv(argv)
    return start_cli(target, *args, nproc=nproc, env=env, timeout=timeout)


def run_python(argv: Sequence[str], *, env: Optional[dict] = None, timeout: float = 600,
               check: bool = False) -> subprocess.CompletedProcess:
    """`run_cli` for a full `[sys.executable, ...]` command line: what subprocess.run(argv, cwd=ROOT,
    capture_output=True, text=True) gives, without a fresh interpreter."""
    return start_python(argv, env=env, timeout=timeout).finish(check=check)
