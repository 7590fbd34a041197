"""Distributed checkpoints (Megatron-Core dist_checkpointing, torch_dist) with atomic publication.

Layout (Megatron-LM compatible names):
    SAVE/iter_0000100/                 one torch_dist checkpoint (+ run_config.json)
    SAVE/latest_checkpointed_iteration.txt

A checkpoint is written to `iter_XXXXXXX.tmp`, renamed to its final name only after every rank
finished writing, and only then does the tracker file (itself written to a temp name and
renamed) point at it. A crash at any point leaves the previous checkpoint as "latest".

Contents: model (one entry per virtual pipeline chunk), optimizer (distributed optimizer with the
`fully_reshardable` layout, so TP/PP/DP may change on load), LR scheduler, iteration, consumed
train/valid samples (the data position), per-rank RNG states, the run configuration and the
parallel layout it was saved with. A model-only checkpoint (`model_only=True`, a state without an
optimizer, or `save_weights`) has the model and the metadata only: `--load` starts from its weights
at iteration 0 with a fresh optimizer.

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
import random
import re
import shutil
import sys
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from packaging.version import Version
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

from megatron_rpt.config.schema import RunConfig
from megatron_rpt.platform import get_platform
from megatron_rpt.training.faults import fault_point
from megatron_rpt.models.gpt import unwrap

TRACKER = "latest_checkpointed_iteration.txt"
OPTIMIZER_SHARDING = "fully_reshardable"  # the default fully_sharded_model_space cannot save (docs/megatron-core-on-cpu.md)
_ITER_DIR = re.compile(r"iter_(\d+)")
# Checkpoint folders this process loaded (real paths): retention never deletes them.
_LOADED_FROM: set = set()


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or inconsistent with the run."""


@dataclass
class LoadedCheckpoint:
    iteration: int
    consumed_train_samples: int
    consumed_valid_samples: int
    path: str
    resharded: bool


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


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _layout() -> dict:
    return {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
        "vp": parallel_state.get_virtual_pipeline_model_parallel_world_size(),
    }


def _rng_state() -> dict:
    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(state: Optional[dict]) -> ShardedObject:
    pp, tp = parallel_state.get_pipeline_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_world_size()
    return ShardedObject(
        "rng_state", state, (pp, tp),
        (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()),
        replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True))


def prepare_optimizer_for_load(optimizer) -> None:
    """Give a fresh distributed optimizer Adam states to load into (W1 in docs/megatron-core-on-cpu.md).

    `DistributedOptimizer.state_dict()` (distrib_optimizer.py, 0.16.1 ~l.642) asserts one shared
    `step` over param states, and a freshly built torch-AdamW-backed optimizer (no Apex/TE, on CPU
    AND on GPU) has none, so `sharded_state_dict(is_loading=True)` fails. Upstream's own
    `_init_optimizer_states_with_dummy_values` fills them; the checkpoint then overwrites them.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        init = getattr(opt, "_init_optimizer_states_with_dummy_values", None)
        inner = getattr(opt, "optimizer", None)
        if init is not None and inner is not None and not getattr(inner, "state", None):
            init()


def _state_dict(state, *, is_loading: bool, with_optimizer: bool, with_rng: bool) -> dict:
    sd: dict = {}
    chunks = [unwrap(m) for m in state.model]  # keys without DDP/Float16Module prefixes (as Megatron-LM)
    if len(chunks) == 1:
        sd["model"] = chunks[0].sharded_state_dict()
    else:
        for i, chunk in enumerate(chunks):
            sd[f"model{i}"] = chunk.sharded_state_dict()
    if with_optimizer:
        # No "chained_N." prefix on tensor states: keys are parameter names only, so a checkpoint
        # loads whether the parameters sit in one optimizer or in a dense + expert chain (EP changes).
        sd["optimizer"] = state.optimizer.sharded_state_dict(
            sd, is_loading=is_loading, metadata={"distrib_optim_sharding_type": OPTIMIZER_SHARDING,
                                                 "chained_optim_avoid_prefix": True})
        sd["opt_param_scheduler"] = state.scheduler.state_dict()
    if with_rng:
        sd["rng_state"] = _rng_sharded_object(None if is_loading else _rng_state())
    return sd


def save_checkpoint(root: str, iteration: int, state, cfg: RunConfig, *, consumed_train_samples: int,
                    consumed_valid_samples: int, fully_parallel: bool = True, sharded_strategy=None,
                    model_only: bool = False, keep_last: Optional[int] = None) -> str:
    """Write iteration `iteration` under `root` atomically; returns the final directory.

    `sharded_strategy`: a torch_dist save strategy other than Megatron-Core's default (the
    converter's tensor-at-a-time `convert.streaming.LazySaveStrategy`). `model_only`: the weights
    only (no optimizer, scheduler or RNG state), also implied by a state without an optimizer.
    `keep_last`: retention after the save (module docstring); None: `cfg.checkpoint.ckpt_keep_last`.
    """
    final = checkpoint_path(root, iteration)
    tmp = final + ".tmp"
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of an interrupted save
        os.makedirs(tmp)
    fault_point("save-begin", iteration, _rank())
    _barrier()
    # A state without optimizer (tools/convert_checkpoint.py import) writes a model-only
    # checkpoint: `--load` starts from its weights at iteration 0 with a fresh optimizer.
    model_only = model_only or getattr(state, "optimizer", None) is None
    sd = _state_dict(state, is_loading=False, with_optimizer=not model_only, with_rng=not model_only)
    sd.update(iteration=iteration, consumed_train_samples=consumed_train_samples,
              consumed_valid_samples=consumed_valid_samples, run_config=cfg.to_dict(),
              parallel_layout=_layout(), checkpoint_version=1, model_only=model_only)
    strategy = sharded_strategy or get_default_save_sharded_strategy()
    if fully_parallel and parallel_state.get_data_parallel_world_size() > 1:
        strategy = FullyParallelSaveStrategyWrapper(
            strategy, parallel_state.get_data_parallel_group(with_context_parallel=True))
    dist_checkpointing.save(sd, tmp, sharded_strategy=strategy)
    _barrier()
    if _rank() == 0:
        with open(os.path.join(tmp, "run_config.json"), "w") as f:
            json.dump({"iteration": iteration, "run_config": cfg.to_dict(), "parallel_layout": _layout()},
                      f, indent=2, default=str)
        fault_point("save-written", iteration, 0)
        if os.path.exists(final):  # re-saving an iteration: keep the old one until the new is in place
            old = final + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fault_point("save-published", iteration, 0)
        tracker_tmp = os.path.join(root, TRACKER + ".tmp")
        with open(tracker_tmp, "w") as f:
            f.write(str(iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tracker_tmp, os.path.join(root, TRACKER))
    _barrier()
    keep_last = cfg.checkpoint.ckpt_keep_last if keep_last is None else keep_last
    if keep_last is not None and _rank() == 0:   # the save is complete on every rank (barrier above)
        deleted = prune_checkpoints(root, keep_last, iteration)
        if deleted and not model_only:
            print(f"> --ckpt-keep-last {keep_last}: deleted {', '.join(os.path.basename(p) for p in deleted)}",
                  flush=True)
    return final


def save_weights(root: str, iteration: int, state, cfg: RunConfig) -> str:
    """The model's weights only (no optimizer, scheduler or RNG state) as a rolling model-only
    checkpoint under `root`: `root/iter_XXXXXXX` is written atomically and then the previous one is
    deleted (retention 1). Collective over all ranks, like `save_checkpoint`; returns the folder.
    The external rollout engine exports it to Hugging Face format for its server."""
    final = save_checkpoint(root, iteration, state, cfg, consumed_train_samples=0, consumed_valid_samples=0,
                            fully_parallel=cfg.checkpoint.ckpt_fully_parallel_save, model_only=True, keep_last=1)
    if _rank() == 0:   # the folder is this writer's alone: leftovers of a crashed or later run go too
        for name in os.listdir(root):
            path = os.path.join(root, name)
            if name.startswith("iter_") and path != final and os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
    return final


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


# megatron-core 0.16's `param_group_identifier_keys` (optimizer/optimizer.py): how a saved param group
# is matched to the current one on load.
_LEGACY_GROUP_KEYS = ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr")


def _adopt_saved_group_schedule(optimizer, loaded_optimizer_state) -> None:
    """Keep resuming with another --lr/--min-lr/--weight-decay working on megatron-core >= 0.19.

    0.19 matches saved param groups to the current ones also by max_lr, min_lr, start_wd, end_wd
    (and optimizer): `param_group_identifier_keys` in optimizer/optimizer.py, so a changed value fails
    the load ("Could not find parameter group with key ..."; a KeyError in
    DistributedOptimizer.load_state_dict). 0.16 matched by the four keys above and the saved group,
    with its saved max_lr/min_lr, replaced the current one (like the scheduler, which takes the
    checkpoint's values: use_checkpoint_opt_param_scheduler). Same here: the current groups take the
    saved values of the extra keys before loading, so the groups match and the result is 0.16's.
    """
    try:
        from megatron.core.optimizer.optimizer import param_group_identifier_keys
    except ImportError:
        return
    extra = [k for k in param_group_identifier_keys if k not in _LEGACY_GROUP_KEYS]
    if not extra:
        return

    def legacy(group):
        return tuple(group.get(k, group.get(f"pre_{k}")) for k in _LEGACY_GROUP_KEYS)

    current = {}
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in getattr(getattr(opt, "optimizer", None), "param_groups", []):
            current.setdefault(legacy(group), []).append(group)

    def walk(d):
        if isinstance(d, dict):
            for key, value in d.items():
                if key == "param_groups" and isinstance(value, list):
                    for saved in value:
                        if isinstance(saved, dict):
                            for group in current.get(legacy(saved), []):
                                group.update({k: saved[k] for k in extra if k in saved})
                else:
                    walk(value)

    walk(loaded_optimizer_state)


def _same_structure(loaded, requested):
    """The loaded optimizer state fitted to the structure this optimizer asked for.

    Tensor states are matched by parameter name, so they follow the current layout. The common
    (non-tensor) part is merged in as saved; when the number of chained optimizers changed (EP on
    or off: Megatron-Core puts expert parameters in a second optimizer) it arrives under the saved
    structure's keys and describes the saved grouping. Then only the tensor states are taken from
    the checkpoint; param groups and the rest stay the current optimizer's (the scheduler sets
    their learning rates) and the saved Adam step count is given to every optimizer of the chain.
    """
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase

    changed = isinstance(loaded, dict) and isinstance(requested, dict) and set(loaded) != set(requested)

    def current(want):
        if isinstance(want, LocalNonpersistentObject):
            return want.unwrap()
        if isinstance(want, dict):
            return {k: current(v) for k, v in want.items()}
        if isinstance(want, list):
            return [current(v) for v in want]
        return want

    def fit(got, want):
        if isinstance(want, ShardedBase):
            return got
        if isinstance(want, dict):
            out = dict(got) if isinstance(got, dict) and not changed else {}  # keep e.g. state["common_step"]
            out.update({k: fit(got.get(k) if isinstance(got, dict) else None, v) for k, v in want.items()})
            return out
        if changed or got is None:
            return current(want)
        if isinstance(want, list) and isinstance(got, list) and len(got) == len(want):
            return [fit(g, w) for g, w in zip(got, want)]
        return got

    def find_step(d):
        # Megatron-Core saves one Adam step count per optimizer: state["common_step"].
        if isinstance(d, dict):
            if isinstance(d.get("state"), dict) and "common_step" in d["state"]:
                return d["state"]["common_step"]
            for v in d.values():
                found = find_step(v)
                if found is not None:
                    return found
        return None

    def add_step(d, step):
        if isinstance(d, dict):
            if isinstance(d.get("state"), dict) and "param_groups" in d and "common_step" not in d["state"]:
                d["state"]["common_step"] = step.clone() if torch.is_tensor(step) else step
            for v in d.values():
                add_step(v, step)

    fitted = fit(loaded, requested)
    step = find_step(loaded) if changed else None
    if step is not None:  # every parameter took the same number of Adam steps
        add_step(fitted, step)
    return fitted


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
    _check_files(path)
    try:
        common = dist_checkpointing.load_common_state_dict(path)
    except Exception as e:  # noqa: BLE001 - any failure here means an unreadable checkpoint
        raise CheckpointError(f"--load {root}: cannot read checkpoint {path}: {e}") from e
    return path, common


def _check_files(path: str) -> None:
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


def load_checkpoint(root: str, state, cfg: RunConfig, *, iteration: Optional[int] = None) -> Optional[LoadedCheckpoint]:
    """Load the latest (or `iteration`) checkpoint under `root` into `state`; None if there is none.

    A checkpoint that is incomplete or unreadable is a CheckpointError naming what is wrong; with
    --ckpt-fallback-to-previous (and no explicit iteration) the newest earlier intact one is loaded
    instead, with a warning (a failed attempt may have loaded some tensors in place; the fallback
    overwrites all of them).
    """
    try:
        return _load_checkpoint(root, state, cfg, iteration)
    except CheckpointError as error:
        if iteration is not None or not cfg.checkpoint.ckpt_fallback_to_previous:
            raise
        failed = read_tracker(root)
        earlier = sorted((int(n[5:]) for n in os.listdir(root) if n.startswith("iter_") and n[5:].isdigit()
                          and (failed is None or int(n[5:]) < failed)), reverse=True)
        for it in earlier:
            if _rank() == 0:
                print(f"> WARNING --ckpt-fallback-to-previous: {error}; trying {checkpoint_path(root, it)}",
                      file=sys.stderr, flush=True)
            try:
                return _load_checkpoint(root, state, cfg, it)
            except CheckpointError as e:
                error = e
        raise CheckpointError(f"{error} (and no earlier checkpoint under {root} loads: "
                              f"--ckpt-fallback-to-previous found nothing intact)") from None


def _load_checkpoint(root: str, state, cfg: RunConfig, iteration: Optional[int]) -> Optional[LoadedCheckpoint]:
    """Load the latest (or `iteration`) checkpoint under `root` into `state`; None if there is none.

    Optimizer and RNG state are skipped with --finetune / --no-load-optim / --no-load-rng; RNG is
    also skipped (with a warning) when the tensor/pipeline layout differs from the saved one.
    """
    c = cfg.checkpoint
    opened = open_checkpoint(root, iteration)
    if opened is None:
        return None
    path, common = opened
    saved_layout = common.get("parallel_layout", {})
    layout = _layout()
    same_layout = all(saved_layout.get(k) == layout[k] for k in ("tp", "pp"))
    model_only = bool(common.get("model_only")) or getattr(state, "optimizer", None) is None
    load_optim = not (c.finetune or c.no_load_optim or model_only)
    load_rng = not (c.finetune or c.no_load_rng or model_only) and same_layout
    if not same_layout and not (c.finetune or c.no_load_rng or model_only) and _rank() == 0:
        warnings.warn(f"checkpoint {path} was saved with TP={saved_layout.get('tp')} PP={saved_layout.get('pp')}; "
                      f"loading into TP={layout['tp']} PP={layout['pp']}: RNG state not restored")
    if load_optim:
        prepare_optimizer_for_load(state.optimizer)
    sd = _state_dict(state, is_loading=True, with_optimizer=load_optim, with_rng=load_rng)
    loaded = load_sharded(sd, path)
    chunks = [unwrap(m) for m in state.model]
    if len(chunks) == 1:
        chunks[0].load_state_dict(loaded["model"], strict=True)
    else:
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(loaded[f"model{i}"], strict=True)
    if load_optim:
        fitted = _same_structure(loaded["optimizer"], sd["optimizer"])
        _adopt_saved_group_schedule(state.optimizer, fitted)
        state.optimizer.load_state_dict(fitted)
        state.scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if load_rng:
        _set_rng_state(loaded["rng_state"])
    _LOADED_FROM.add(os.path.realpath(path))
    if c.finetune or common.get("model_only"):
        return LoadedCheckpoint(0, 0, 0, path, not same_layout)
    return LoadedCheckpoint(int(common["iteration"]), int(common["consumed_train_samples"]),
                            int(common["consumed_valid_samples"]), path, not same_layout)
