"""Fault injection for crash-safety tests (and for users who want to check their own storage).

`MRPT_FAULT_INJECT=POINT@ITERATION[@RANK]` makes the process of RANK (default 0) kill itself with
SIGKILL, the way a node failure or the OOM killer would, when it reaches POINT while saving the
checkpoint of ITERATION. Points, in the order of a save (`checkpoint/sharded.save_sharded`):

- `save-begin`: the temporary folder exists, nothing is written yet;
- `save-scheduled` (--async-save only): the writer process was started and writes the shards in the
  background; the rank dies as it would while training on during an async save;
- `save-written`: every rank has written its files, the folder still has its temporary name (with
  --async-save this and the next point are reached in the finalisation, iterations later);
- `save-published`: the folder has its final name, the tracker file still names the previous one.

Unset (the default) it does nothing.
"""

from __future__ import annotations

import os
import signal

POINTS = ("save-begin", "save-scheduled", "save-written", "save-published")
ENV = "MRPT_FAULT_INJECT"


def fault_point(point: str, iteration: int, rank: int) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    parts = spec.split("@")
    if parts[0] not in POINTS or len(parts) not in (2, 3) or not all(p.isdigit() for p in parts[1:]):
        raise ValueError(f"{ENV}={spec!r}: expected POINT@ITERATION[@RANK] with POINT one of {', '.join(POINTS)}")
    want_rank = int(parts[2]) if len(parts) == 3 else 0
    if parts[0] == point and int(parts[1]) == iteration and rank == want_rank:
        os.kill(os.getpid(), signal.SIGKILL)
