"""The rollout server as a process the external engine runs itself (reload="restart"), and the
environment of the engine's child processes.

`ServerProcess.start(folder)` stops the server it started before (its whole process group), runs
`restart_command` with "{model_path}" substituted in a new session, its output appended to
`<log_dir>/rollout_server.log`, waits for GET /health and checks that /v1/models names the folder;
an early exit or a silent /health raises a RolloutError with the log's last lines.

`child_env()`: a child (the server, the weight sync's HF export) is not a rank of the trainer's job,
so the launcher's RANK/WORLD_SIZE/MASTER_*/SLURM_*/... variables are removed from its environment.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from typing import Optional, Sequence, Union

from megatron_rpt.inference.base import RolloutError
from megatron_rpt.inference.external.client import Client

# Variables by which a child would believe it is a rank of the trainer's job.
_LAUNCHER_PREFIXES = ("SLURM_", "TORCHELASTIC_", "PMI_", "OMPI_")
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                  "MASTER_ADDR", "MASTER_PORT", "NODE_RANK")


class ServerProcess:
    """The server this engine runs with `restart_command` (a shell-style command line or argv list with
    "{model_path}"); `log_dir`: the log's folder (None: the served folder's parent); `startup_timeout`:
    seconds to wait for /health. `proc` is the running server's Popen, None when none was started."""

    def __init__(self, client: Client, restart_command: Union[str, Sequence[str], None] = None, *,
                 log_dir: Optional[str] = None, startup_timeout: float = 600.0):
        self.client = client
        self.restart_command = restart_command
        self.log_dir = log_dir
        self.startup_timeout = startup_timeout
        self.proc: Optional[subprocess.Popen] = None
        self.log: Optional[str] = None

    def start(self, folder: str) -> None:
        """(Re)start the server on `folder` with `restart_command`; wait for /health and check /v1/models."""
        self.stop()
        url = self.client.url
        cmd = self.restart_command
        argv = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
        argv = [a.replace("{model_path}", folder) for a in argv]
        log_dir = self.log_dir or os.path.dirname(folder)
        os.makedirs(log_dir, exist_ok=True)
        self.log = os.path.join(log_dir, "rollout_server.log")
        start = os.path.getsize(self.log) if os.path.isfile(self.log) else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=child_env(),
                                         start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise RolloutError(f"the rollout server ({argv[0]} ...) exited with {self.proc.returncode} "
                                   f"before {url}/health answered; log {self.log}:\n"
                                   f"{_tail(self.log, start)}")
            try:
                self.client.request("GET", "/health", timeout=5, retries=0, expect_json=False)
                break
            except RolloutError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RolloutError(f"{url}/health did not answer within {self.startup_timeout:.0f} s of "
                                       f"starting {argv[0]}; log {self.log}:\n{_tail(self.log, start)}")
                time.sleep(0.5)
        self.client.check_models(folder)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server process this engine started (its whole process group), if any."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass


def child_env() -> dict:
    """This process's environment without the launcher's rank variables (a child is not a rank)."""
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCHER_VARS and not k.startswith(_LAUNCHER_PREFIXES)}
    return env


def _tail(path: Optional[str], start: int = 0, lines: int = 15) -> str:
    """The last lines of a log written since byte `start`."""
    if not path or not os.path.isfile(path):
        return ""
    with open(path, "rb") as f:
        f.seek(max(start, os.path.getsize(path) - 8192))
        return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-lines:])
