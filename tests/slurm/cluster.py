"""A real one-node SLURM cluster (Debian's slurmctld + slurmd, loopback only) for the tests.

The recipe and its pitfalls are in this module's comments. Everything lives under one folder of the test
session (config, state, spool, logs, pid files); ports are picked free; auth/none (no munge). The
node advertises 8 CPUs on a 2-core machine (`SlurmdParameters=config_overrides`) so that 4-task
steps are scheduled. `stop()` shuts the daemons down and kills whatever is left, so nothing keeps
running after the tests.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional

from megatron_rpt.distributed import free_port

DAEMONS = ("slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")


def unavailable_reason() -> Optional[str]:
    """Why a local cluster cannot be started here (None when it can)."""
    if os.geteuid() != 0:
        return "the local SLURM cluster runs its daemons as root; not root"
    if not Path("/etc/debian_version").exists():
        return "the local SLURM cluster uses Debian's slurm packages; not a Debian/Ubuntu machine"
    missing = [b for b in DAEMONS + CLIENTS if shutil.which(b) is None]
    if missing:
        return (f"SLURM binaries missing ({', '.join(missing)}): apt-get install slurmctld slurmd slurm-client "
                "(.ci/run does this)")
    return None


class LocalSlurm:
    def __init__(self, root: Path, cpus: int = 8, kill_wait: int = 30):
        self.root = Path(root)
        self.cpus, self.kill_wait = cpus, kill_wait
        self.conf = self.root / "etc" / "slurm.conf"

    # ---------------------------------------------------------------- lifecycle
    def write_config(self) -> None:
        for sub in ("etc", "state", "spool", "run", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        r = self.root
        ctld_port = free_port()
        slurmd_port = free_port()
        while slurmd_port == ctld_port:   # two bind(0) calls in a row may be given the same port
            slurmd_port = free_port()
        self.conf.write_text(f"""ClusterName=mrpttest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
MailProg=/bin/true
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
CommunicationParameters=NoInAddrAny
KillWait={self.kill_wait}
NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")

    @property
    def env(self) -> dict:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def cmd(self, *args, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(a) for a in args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, args))} failed ({proc.returncode}): {proc.stderr.strip()}\n"
                               + self.log_tail())
        return proc

    def start(self, timeout: float = 90) -> None:
        self.write_config()
        self.cmd("slurmctld", "-i")
        self.cmd("slurmd", "-N", "localhost")
        deadline = time.time() + timeout
        while time.time() < deadline:
            if all(self._alive(d) for d in DAEMONS):
                info = self.cmd("sinfo", "-h", "-o", "%t", check=False).stdout.strip()
                if info in ("idle", "mix", "alloc"):
                    probe = self.cmd("timeout", "20", "srun", "-n1", "-t1", "echo", "ok", check=False, timeout=30)
                    if probe.stdout.strip() == "ok":
                        return
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"the local SLURM cluster did not become ready in {timeout:.0f} s\n" + self.log_tail())

    def stop(self) -> None:
        self.cmd("scontrol", "shutdown", check=False)
        deadline = time.time() + 15
        while time.time() < deadline and any(self._alive(d) for d in DAEMONS):
            time.sleep(0.3)
        for d in DAEMONS:
            pid = self._pid(d)
            if pid and self._alive(d):
                os.kill(pid, signal.SIGKILL)

    def leftovers(self, timeout: float = 20) -> list[str]:
        """This cluster's Slurm processes (daemons, step daemons) still alive after `stop()`, waiting up
        to `timeout` for step daemons that are still winding down; [] when all are gone. A process is
        this cluster's when its environment carries this SLURM_CONF (the daemons get it from `cmd`, the
        step daemons inherit it), so another cluster on the machine (a second test run) is not counted."""
        deadline = time.time() + timeout
        mine = f"SLURM_CONF={self.conf}".encode()
        while True:
            left = []
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
                    state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
                    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                if state != "Z" and re.match(r"(\S*/)?(slurmctld|slurmd|slurmstepd)\b", cmd) and mine in environ:
                    left.append(f"{pid} {cmd}")
            if not left or time.time() > deadline:
                return left
            time.sleep(0.5)

    # ---------------------------------------------------------------- jobs
    def sbatch(self, *args, env: Optional[dict] = None) -> int:
        proc = subprocess.run(["sbatch", "--parsable", *map(str, args)], env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed: {proc.stderr.strip()}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        text = self.cmd("scontrol", "show", "job", "-o", job_id).stdout
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", text))

    def wait(self, job_id: int, until=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"),
             timeout: float = 600) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in until:
                return info
            time.sleep(1)
        self.cmd("scancel", job_id, check=False)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout:.0f} s\n"
                           + self.log_tail())

    # ---------------------------------------------------------------- helpers
    def _pid(self, daemon: str) -> Optional[int]:
        try:
            return int((self.root / "run" / f"{daemon}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def _alive(self, daemon: str) -> bool:
        pid = self._pid(daemon)
        if not pid:
            return False
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except OSError:
            return False
        return state != "Z"  # exited daemons stay zombies until PID 1 reaps them

    def log_tail(self, lines: int = 20) -> str:
        out = []
        for d in DAEMONS:
            path = self.root / "log" / f"{d}.log"
            if path.exists():
                out.append(f"--- {path} ---\n" + "\n".join(path.read_text().splitlines()[-lines:]))
        return "\n".join(out)
