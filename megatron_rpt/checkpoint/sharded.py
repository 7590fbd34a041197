"""Sharded checkpoint I/O (Megatron-Core dist_checkpointing, torch_dist) with atomic publication.

A checkpoint is written to `iter_XXXXXXX.tmp`, renamed to its final name only after every rank
finished writing, and only then does the tracker file (itself written atomically) point at it. A
crash at any point leaves the previous checkpoint as "latest" (`faults.py` kills a rank at each of
these points in the crash-safety tests).

Asynchronous saves (`--async-save`, `async_save=True`): Megatron-Core's `dist_checkpointing.save(...,
async_sharded_save=True)` plans the save (collective), writes what is not sharded tensor data, and
returns an `AsyncRequest`; scheduling it on the process's `AsyncCallsQueue` forks a writer process
(Megatron-Core's `TemporalAsyncCaller`) that writes the shards from the fork's copy-on-write snapshot
while training goes on. `finalize_async_saves` asks every rank whether its writer is done (one
all-reduce, only while a save is pending, so every rank takes the same branch) and, once all are,
runs the finalisation on every rank: DCP's `.metadata`, then ours (run_config.json, the rename, the
tracker, retention). Until then the checkpoint has its `.tmp` name and the previous one is latest.

Common state (Megatron-LM's names where it has them, docs/megatron-lm-checkpoints.md): `iteration`,
`checkpoint_version` (Megatron-LM's 3.0), `content_metadata` (how the state dict was built), and
ours: `run_config` (also as run_config.json next to the shards, readable without torch),
`parallel_layout` (tp/pp/dp/vp at save time), `model_only`, `mrpt_checkpoint_version`, plus what
the writer adds (training: `args`, consumed samples, the FLOP total).
The model is stored under `model` (one chunk) or `model0..N` (virtual pipeline stages), with keys
free of DDP/Float16Module prefixes, as Megatron-LM does.

What goes into a training checkpoint (optimizer, scheduler, RNG) and when to save is the training
loop's business (`training/checkpointing.py`); this module is what training, RPT and conversion share.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
from typing import Callable, Optional

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
from packaging.version import Version

from megatron_rpt.checkpoint.faults import fault_point
from megatron_rpt.checkpoint.layout import (
    RUN_CONFIG, TRACKER, CheckpointError, checkpoint_path, mark_loaded, publish_folder, read_tracker, write_tracker)
from megatron_rpt.config.schema import RunConfig
from megatron_rpt.models.gpt import unwrap
from megatron_rpt.platform import get_platform

# megatron-rpt's own format version (common state `mrpt_checkpoint_version`; checkpoints before it
# stored 1 under `checkpoint_version`). `checkpoint_version` itself is Megatron-LM's: 3.0 since its
# torch_dist checkpoints; its loader reorders the QKV weights of anything below 2.0.
CHECKPOINT_VERSION = 2
MEGATRON_LM_CHECKPOINT_VERSION = 3.0


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def parallel_layout() -> dict:
    return {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
        "vp": parallel_state.get_virtual_pipeline_model_parallel_world_size(),
    }


def model_state_dict(model_chunks, key: str = "model") -> dict:
    """The sharded state dict of the model chunks under their checkpoint keys (`key`, or `key`0, `key`1...
    per virtual stage). A `key` other than "model" (another copy of the model: RLP's EMA teacher) also
    prefixes every tensor's name with "`key`." so that its tensors do not collide with the policy's."""
    chunks = [unwrap(m) for m in model_chunks]  # keys without DDP/Float16Module prefixes (as Megatron-LM)
    prefix = "" if key == "model" else key + "."
    if len(chunks) == 1:
        return {key: chunks[0].sharded_state_dict(prefix=prefix)}
    return {f"{key}{i}": chunk.sharded_state_dict(prefix=prefix) for i, chunk in enumerate(chunks)}


def load_model_state(model_chunks, loaded: dict, key: str = "model") -> None:
    """Copy a loaded `model_state_dict` into the chunks (strict: every key present, none extra)."""
    chunks = [unwrap(m) for m in model_chunks]
    prefix = "" if key == "model" else key + "."
    names = [key] if len(chunks) == 1 else [f"{key}{i}" for i in range(len(chunks))]
    for name, chunk in zip(names, chunks):
        chunk.load_state_dict({k[len(prefix):] if prefix and k.startswith(prefix) else k: v
                               for k, v in loaded[name].items()}, strict=True)


def save_sharded(root: str, iteration: int, sharded_state_dict: dict, cfg: RunConfig, *, model_only: bool,
                 common: Optional[dict] = None, fully_parallel: bool = True, sharded_strategy=None,
                 async_save: bool = False, on_published: Optional[Callable[[], None]] = None,
                 content_metadata: Optional[dict] = None) -> str:
    """Write `sharded_state_dict` (+ the common state) as iteration `iteration` under `root`,
    atomically (module docstring); collective over every rank. Returns the final folder.

    `sharded_strategy`: a torch_dist save strategy other than Megatron-Core's default (the
    converter's tensor-at-a-time `convert.streaming.LazySaveStrategy`). `fully_parallel`: spread
    the writing of replicated shards over the data-parallel ranks. `async_save`: return once the
    writer process is started; the folder is published by a later `finalize_async_saves`.
    `on_published()`: called on every rank once the folder is published and the tracker names it
    (retention). `content_metadata`: Megatron-Core's record of how the state dict was built (the
    optimizer's sharding type), read back by loaders (`checkpoint_content_metadata`)."""
    final = checkpoint_path(root, iteration)
    tmp = final + ".tmp"
    if rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of an interrupted save
        os.makedirs(tmp)
    fault_point("save-begin", iteration, rank())
    barrier()
    sd = dict(sharded_state_dict)
    sd.update(common or {})
    sd.update(iteration=iteration, run_config=cfg.to_dict(), parallel_layout=parallel_layout(),
              checkpoint_version=MEGATRON_LM_CHECKPOINT_VERSION, mrpt_checkpoint_version=CHECKPOINT_VERSION,
              model_only=model_only)
    strategy = sharded_strategy or get_default_save_sharded_strategy()
    if fully_parallel and parallel_state.get_data_parallel_world_size() > 1:
        strategy = FullyParallelSaveStrategyWrapper(
            strategy, parallel_state.get_data_parallel_group(with_context_parallel=True))

    def publish() -> None:
        barrier()                   # every rank's shards (and DCP's .metadata) are complete
        if rank() == 0:
            with open(os.path.join(tmp, RUN_CONFIG), "w") as f:
                json.dump({"iteration": iteration, "run_config": cfg.to_dict(), "parallel_layout": parallel_layout()},
                          f, indent=2, default=str)
            fault_point("save-written", iteration, 0)
            publish_folder(tmp, final)  # re-saving an iteration keeps the old one until the new is in place
            fault_point("save-published", iteration, 0)
            write_tracker(root, iteration)
        if on_published is not None:
            on_published()
        barrier()

    kwargs = {"content_metadata": content_metadata} if content_metadata is not None else {}
    if not async_save:
        dist_checkpointing.save(sd, tmp, sharded_strategy=strategy, **kwargs)
        publish()
        return final
    if "async_strategy" in inspect.signature(dist_checkpointing.save).parameters:
        kwargs["async_strategy"] = "mcore"  # >= 0.17 defaults to nvidia-resiliency-ext's writer
    request = dist_checkpointing.save(sd, tmp, sharded_strategy=strategy, async_sharded_save=True, **kwargs)
    request.add_finalize_fn(publish)
    _async_queue().schedule_async_request(request)   # forks the writer: the state is snapshotted here
    fault_point("save-scheduled", iteration, rank())
    return final


_ASYNC_QUEUE: Optional[AsyncCallsQueue] = None


def _async_queue() -> AsyncCallsQueue:
    global _ASYNC_QUEUE
    if _ASYNC_QUEUE is None:
        # Temporal (a process forked per save): it inherits the CPU compatibility layer; the
        # persistent caller spawns a fresh interpreter without it (and calls torch.cuda.set_device).
        _ASYNC_QUEUE = AsyncCallsQueue(persistent=False)
    return _ASYNC_QUEUE


def pending_async_saves() -> int:
    """Asynchronous saves scheduled and not finalised yet (the same number on every rank)."""
    return 0 if _ASYNC_QUEUE is None else _ASYNC_QUEUE.get_num_unfinalized_calls()


def finalize_async_saves(blocking: bool) -> int:
    """Publish the asynchronous saves whose writers are done on every rank (`blocking`: wait for all);
    returns how many were published. Collective on every rank while a save is pending (one all-reduce
    per pending save checked), a no-op otherwise. A writer that failed raises here on every rank and
    its checkpoint stays unpublished."""
    if not pending_async_saves():
        return 0
    return len(_ASYNC_QUEUE.maybe_finalize_async_calls(blocking=blocking))


def open_checkpoint(root: str, iteration: Optional[int] = None) -> Optional[tuple[str, dict]]:
    """(folder, common state) of the latest (or `iteration`) checkpoint under `root`; None if there
    is none. Errors name what is missing or unreadable."""
    if iteration is None:
        iteration = read_tracker(root)
        if iteration is None:
            if os.path.isdir(root) and any(n.startswith("iter_") for n in os.listdir(root)):
                raise CheckpointError(f"--load {root}: no {TRACKER} but iteration folders exist; "
                                      f"pass --ckpt-step N to pick one")
            return None
    path = checkpoint_path(root, iteration)
    if not os.path.isdir(path):
        raise CheckpointError(f"--load {root}: checkpoint folder {path} for iteration {iteration} not found")
    old_reader = Version(get_platform().megatron_core_version) < Version("0.17")
    if old_reader and not os.path.isfile(os.path.join(path, "common.pt")):
        # megatron-core >= 0.17 keeps the common state inside the .distcp files; 0.16 cannot read it.
        if any(n.endswith(".distcp") for n in os.listdir(path)):
            raise CheckpointError(f"--load {root}: {path} was saved by megatron-core >= 0.17 (no common.pt); "
                                  f"load it with megatron-core >= 0.17 (Python >= 3.12)")
    check_files(path)
    try:
        common = dist_checkpointing.load_common_state_dict(path)
    except Exception as e:  # noqa: BLE001 - any failure here means an unreadable checkpoint
        raise CheckpointError(f"--load {root}: cannot read checkpoint {path}: {e}") from e
    return path, common


def check_files(path: str) -> None:
    """Every data file the checkpoint's DCP metadata refers to exists and is long enough (a file
    removed or truncated after the save is named here instead of failing deep inside a load)."""
    from torch.distributed.checkpoint import FileSystemReader
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise CheckpointError(f"{path}: .metadata is missing (not a torch_dist checkpoint, or incomplete)")
    try:
        storage = FileSystemReader(path).read_metadata().storage_data
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}/.metadata is unreadable: {type(e).__name__}: {e}") from e
    needed: dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"{path}: data file {name} is missing (the checkpoint is incomplete)")
        if os.path.getsize(file) < size:
            raise CheckpointError(f"{path}: data file {name} has {os.path.getsize(file)} bytes, the metadata "
                                  f"needs {size} (truncated)")


def load_sharded(sharded_state_dict: dict, path: str, *, partial: bool = False) -> dict:
    """`dist_checkpointing.load` of a checkpoint, failures as one CheckpointError. `partial`: the
    state dict holds only some entries (e.g. some layers of a layer-stacked tensor), so Megatron-Core's
    check that the requested shards cover every tensor whole is skipped."""
    try:
        return dist_checkpointing.load(sharded_state_dict, path, validate_access_integrity=not partial)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"loading {path} failed: {type(e).__name__}: {e}") from e


def load_weights(root: str, model_chunks, *, iteration: Optional[int] = None) -> Optional[str]:
    """Only the model's weights of the latest (or `iteration`) checkpoint under `root` into the chunks
    (any checkpoint: full or model-only); returns the folder, None if there is no checkpoint."""
    opened = open_checkpoint(root, iteration)
    if opened is None:
        return None
    path, _ = opened
    load_model_state(model_chunks, load_sharded(model_state_dict(model_chunks), path))
    mark_loaded(path)
    return path
