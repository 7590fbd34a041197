"""A checkpoint root on disk: folder names, the tracker file, atomic publication, retention.

Layout (Megatron-LM compatible names):
    ROOT/iter_0000100/                 one torch_dist checkpoint (+ run_config.json)
    ROOT/latest_checkpointed_iteration.txt

Nothing here touches tensors or process groups: these are the file operations every writer and
reader of a checkpoint root shares (training, RPT, conversion, the RPT proxy model).

Retention (`--ckpt-keep-last N`, megatron-rpt's own flag; Megatron-LM has none): after a save is
published (every rank wrote, the folder renamed, the tracker updated), rank 0 deletes the oldest
complete checkpoints (a final `iter_XXXXXXX` name with DCP's `.metadata`) below the saved iteration
beyond the newest N, the saved one included. Never deleted: the checkpoint just saved, any
checkpoint this process loaded (the one a run resumed from with --load = --save, the KL reference),
checkpoints of later iterations (another history: the user decides) and folders of interrupted
saves (`.tmp`, not complete). A doomed folder is first renamed to `iter_XXXXXXX.deleting`, so a
crash mid-deletion never leaves a torn folder under a checkpoint's name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Optional

from megatron_rpt.fileio import atomic_open

TRACKER = "latest_checkpointed_iteration.txt"
RUN_CONFIG = "run_config.json"
_ITER_DIR = re.compile(r"iter_(\d+)")
# Checkpoint folders this process loaded (real paths): retention never deletes them.
_LOADED_FROM: set = set()


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or inconsistent with the run."""


def checkpoint_path(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_tracker(root: str) -> Optional[int]:
    """The latest complete iteration under `root`, None if there is no checkpoint."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{path}: expected an iteration number, found {text[:40]!r}") from None


def write_tracker(root: str, iteration: int) -> None:
    with atomic_open(os.path.join(root, TRACKER)) as f:
        f.write(str(iteration))


def publish_folder(tmp: str, final: str) -> None:
    """Give the complete folder `tmp` its final name. An existing `final` is kept (as `final.old`)
    until the new one is in place, so a crash leaves either the old or the new folder under the name."""
    if os.path.exists(final):
        old = final.rstrip("/") + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def read_run_config(root: str, iteration: Optional[int], flag: str, step_flag: str):
    """(iteration, folder, RunConfig) of the latest (or `iteration`) checkpoint under `root`, from its
    run_config.json; errors name `flag` (the option that gave `root`) and `step_flag` (the one that picks
    an iteration)."""
    from megatron_rpt.config.schema import RunConfig
    it = iteration if iteration is not None else read_tracker(root)
    if it is None:
        raise CheckpointError(f"{flag} {root}: no checkpoint (no {TRACKER}); pass {step_flag}")
    path = checkpoint_path(root, it)
    meta = os.path.join(path, RUN_CONFIG)
    if not os.path.isfile(meta):
        raise CheckpointError(f"{flag} {root}: {meta} missing (not a megatron-rpt checkpoint, or incomplete)")
    try:
        with open(meta, encoding="utf-8") as f:
            cfg = RunConfig.from_dict(json.load(f)["run_config"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{flag} {root}: {meta} is not a readable run configuration: "
                              f"{type(e).__name__}: {e}") from None
    return it, path, cfg


def mark_loaded(path: str) -> None:
    """Record that this process loaded the checkpoint folder `path` (retention keeps it)."""
    _LOADED_FROM.add(os.path.realpath(path))


def complete_checkpoints(root: str) -> dict[int, str]:
    """iteration -> folder of the complete checkpoints under `root`: a final `iter_XXXXXXX` name (an
    interrupted save keeps its `.tmp` name) holding DCP's `.metadata` (written when a save finishes)."""
    found = {}
    for name in os.listdir(root) if os.path.isdir(root) else ():
        match = _ITER_DIR.fullmatch(name)
        path = os.path.join(root, name)
        if match and os.path.isfile(os.path.join(path, ".metadata")):
            found[int(match.group(1))] = path
    return found


def prune_checkpoints(root: str, keep_last: int, saved_iteration: int) -> list[str]:
    """Retention (module docstring): delete the complete checkpoints under `root` below
    `saved_iteration` beyond the newest `keep_last` (the saved one counts), except those this process
    loaded. Called by one process (rank 0) once the save of `saved_iteration` is published; returns
    the deleted folders."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    older = sorted((it, path) for it, path in complete_checkpoints(root).items() if it < saved_iteration)
    doomed = older[:max(0, len(older) - (keep_last - 1))]
    deleted = []
    for _, path in doomed:
        if os.path.realpath(path) in _LOADED_FROM:
            continue
        trash = path + ".deleting"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(path, trash)              # atomic: no torn folder under a checkpoint's name
        shutil.rmtree(trash, ignore_errors=True)
        deleted.append(path)
    return deleted
