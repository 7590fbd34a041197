"""Training checkpoints: what goes into them and how a run resumes from them.

On-disk layout, atomic publication, retention and sharded I/O are `megatron_rpt.checkpoint`'s
(shared with RPT and conversion); this module is about the loop's state:

Contents: model (one entry per virtual pipeline chunk), optimizer (distributed optimizer with the
`fully_reshardable` layout, so TP/PP/DP may change on load), LR scheduler, iteration, consumed
train/valid samples (the data position), per-rank RNG states, the run configuration and the
parallel layout it was saved with, and the entries of the state's `checkpoint_extras` (training state a
job adds under its own key: RLP's EMA teacher; `load_extra_state`). A model-only checkpoint (`model_only=True`, a state without an
optimizer, or `save_weights`) has the model and the metadata only: `--load` starts from its weights
at iteration 0 with a fresh optimizer.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_rpt.checkpoint.layout import CheckpointError, checkpoint_path, mark_loaded, prune_checkpoints, read_tracker
from megatron_rpt.checkpoint.sharded import (
    load_model_state, load_sharded, model_state_dict, open_checkpoint, parallel_layout, rank, save_sharded)
from megatron_rpt.config.schema import RunConfig
from megatron_rpt.training.optimizer import (LEGACY_GROUP_KEYS, check_resumed_schedule, check_same_param_groups,
                                             group_rates, group_role, load_scheduler_state, param_groups,
                                             saved_param_groups)

# Megatron-Core's default optimizer sharding (fully_sharded_model_space) cannot be saved by the
# torch-optimizer fallback used without Apex/TE; fully_reshardable can, and reshards on load.
OPTIMIZER_SHARDING = "fully_reshardable"


@dataclass
class LoadedCheckpoint:
    iteration: int
    consumed_train_samples: int
    consumed_valid_samples: int
    path: str
    resharded: bool
    num_floating_point_operations_so_far: float = 0   # Megatron-LM's running total (0 in our older ones)


def _rng_state() -> list:
    """This rank's RNG states in Megatron-LM's layout (`get_rng_state` in megatron/training/
    checkpointing.py: a one-element list, one entry per DP rank only with --data-parallel-random-init).
    `cuda_rng_state` only where CUDA is in use (on CPU the "CUDA" generators are the CPU one, P2)."""
    state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng_state"] = torch.cuda.get_rng_state()
    return [state]


# The dict megatron-rpt checkpoints before Megatron-LM's layout held, by its keys.
_OLD_RNG_KEYS = {"random": "random_rng_state", "numpy": "np_rng_state", "torch": "torch_rng_state",
                 "cuda": "cuda_rng_state", "tracker": "rng_tracker_states"}


def _set_rng_state(saved) -> Optional[str]:
    """Restore RNG states saved by `_rng_state` (or by Megatron-LM, or in our older dict layout); None
    when restored, else why not (nothing is changed then): the tracker's states come from the other
    platform (a CUDA generator's state is 16 bytes, the CPU one's 5056)."""
    state = saved[0] if isinstance(saved, list) else {_OLD_RNG_KEYS[k]: v for k, v in saved.items()}
    tracker = tensor_parallel.get_cuda_rng_tracker()
    current, loaded = tracker.get_states(), state["rng_tracker_states"]
    if set(current) != set(loaded) or any(torch.as_tensor(loaded[k]).numel() != current[k].numel() for k in current):
        return "the checkpoint's RNG states were saved on another platform (CUDA vs CPU)"
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if "cuda_rng_state" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    tracker.set_states(loaded)
    return None


def _rng_sharded_object(state: Optional[list]) -> ShardedObject:
    """Megatron-LM's `rng_state` entry: one object per (PP, TP) rank, replicated over DP x CP."""
    pp, tp = parallel_state.get_pipeline_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_world_size()
    return ShardedObject(
        "rng_state", state, (pp, tp),
        (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()),
        replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True))


def sharded_state_dict_metadata(distributed_optimizer: bool) -> dict:
    """How our state dicts are built, as Megatron-LM's `_build_sharded_state_dict_metadata` describes
    it (less the process group); saved as the checkpoint's `content_metadata`, which Megatron-LM's
    loader passes back to `sharded_state_dict` so that the optimizer is read in the saved layout."""
    meta = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if distributed_optimizer:
        meta.update(distrib_optim_sharding_type=OPTIMIZER_SHARDING,
                    distrib_optim_fully_reshardable_mem_efficient=False)
    return meta


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


def _state_dict(state, *, is_loading: bool, with_optimizer: bool, with_rng: bool, metadata: dict) -> dict:
    sd = model_state_dict(state.model)
    if with_optimizer:
        # chained_optim_avoid_prefix: no "chained_N." prefix on tensor states: keys are parameter names
        # only, so a checkpoint loads whether the parameters sit in one optimizer or in a dense + expert
        # chain (EP changes). The sharding type (`metadata`) is the checkpoint's on load.
        sd["optimizer"] = state.optimizer.sharded_state_dict(
            sd, is_loading=is_loading, metadata={"distrib_optim_sharding_type": OPTIMIZER_SHARDING,
                                                 "chained_optim_avoid_prefix": True, **metadata})
        sd["opt_param_scheduler"] = state.scheduler.state_dict()
    if with_rng:
        sd["rng_state"] = _rng_sharded_object(None if is_loading else _rng_state())
    if with_optimizer and not is_loading:
        sd.update(_extras(state))
    return sd


def _extras(state) -> dict:
    """The sharded entries of `state.checkpoint_extras`: objects with a `checkpoint_key` and a
    `sharded_state_dict()` (None: nothing to save yet), loaded back by `load_extra_state`."""
    entries = {}
    for extra in getattr(state, "checkpoint_extras", ()):
        sd = extra.sharded_state_dict()
        if sd is not None:
            entries[extra.checkpoint_key] = sd
    return entries


def load_extra_state(path: str, extra) -> bool:
    """Load `extra`'s entry (see `_extras`) from the checkpoint folder `path` with `extra.load_state(loaded)`;
    False, loading nothing, when the checkpoint has none (saved without it, e.g. by pretraining)."""
    from megatron.core import dist_checkpointing

    if extra.checkpoint_key not in dist_checkpointing.load_common_state_dict(path).get("checkpoint_extras", ()):
        return False
    key = extra.checkpoint_key
    extra.load_state(load_sharded({key: extra.sharded_state_dict(loading=True)}, path)[key])
    return True


def save_checkpoint(root: str, iteration: int, state, cfg: RunConfig, *, consumed_train_samples: int,
                    consumed_valid_samples: int, fully_parallel: bool = True, model_only: bool = False,
                    keep_last: Optional[int] = None, async_save: bool = False,
                    on_published: Optional[Callable[[], None]] = None,
                    num_floating_point_operations_so_far: float = 0) -> str:
    """Write iteration `iteration` of the run's state under `root` atomically (`checkpoint.sharded`);
    returns the final directory.

    `model_only`: the weights only (no optimizer, scheduler or RNG state), also implied by a state
    without an optimizer. `keep_last`: retention after the save (`checkpoint.layout`); None:
    `cfg.checkpoint.ckpt_keep_last`. `async_save`: return once the writer process runs; the folder
    is published, retention applied and `on_published()` called by `checkpoint.sharded.
    finalize_async_saves` once every rank's writer is done (synchronous saves call it before returning).
    The common state follows Megatron-LM's (`args`, `iteration`, `checkpoint_version`,
    `opt_param_scheduler`, `rng_state`, `num_floating_point_operations_so_far`, `content_metadata`;
    docs/megatron-lm-checkpoints.md), plus ours (`run_config`, consumed samples, layout).
    """
    model_only = model_only or getattr(state, "optimizer", None) is None
    metadata = sharded_state_dict_metadata(cfg.parallel.use_distributed_optimizer)
    sd = _state_dict(state, is_loading=False, with_optimizer=not model_only, with_rng=not model_only,
                     metadata=metadata)
    keep_last = cfg.checkpoint.ckpt_keep_last if keep_last is None else keep_last
    extras = [e.checkpoint_key for e in getattr(state, "checkpoint_extras", ()) if e.checkpoint_key in sd]

    def published() -> None:
        if keep_last is not None and rank() == 0:   # the save is complete on every rank
            deleted = prune_checkpoints(root, keep_last, iteration)
            if deleted and not model_only:
                print(f"> --ckpt-keep-last {keep_last}: deleted {', '.join(os.path.basename(p) for p in deleted)}",
                      flush=True)
        if on_published is not None:
            on_published()

    return save_sharded(root, iteration, sd, cfg, model_only=model_only, fully_parallel=fully_parallel,
                        common={"consumed_train_samples": consumed_train_samples,
                                "consumed_valid_samples": consumed_valid_samples,
                                "num_floating_point_operations_so_far": num_floating_point_operations_so_far,
                                "args": _megatron_lm_args(state, cfg, consumed_train_samples, consumed_valid_samples,
                                                          model_only),
                                **({"checkpoint_extras": extras} if extras else {})},
                        async_save=async_save, on_published=published, content_metadata=metadata)


def _megatron_lm_args(state, cfg: RunConfig, consumed_train: int, consumed_valid: int, model_only: bool):
    """Megatron-LM's `args` entry (`config.megatron_lm.checkpoint_args`) with the values it derives."""
    from megatron_rpt.config.megatron_lm import checkpoint_args
    from megatron_rpt.models.gpt import unwrap

    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return checkpoint_args(cfg, padded_vocab_size=unwrap(state.model[0]).vocab_size, world_size=world,
                           data_parallel_size=parallel_state.get_data_parallel_world_size(),
                           consumed_train_samples=consumed_train, consumed_valid_samples=consumed_valid,
                           no_save_optim=model_only, no_save_rng=model_only)


def save_weights(root: str, iteration: int, state, cfg: RunConfig) -> str:
    """The model's weights only (no optimizer, scheduler or RNG state) as a rolling model-only
    checkpoint under `root`: `root/iter_XXXXXXX` is written atomically and then the previous one is
    deleted (retention 1). Collective over all ranks, like `save_checkpoint`; returns the folder.
    The external rollout engine exports it to Hugging Face format for its server."""
    final = save_checkpoint(root, iteration, state, cfg, consumed_train_samples=0, consumed_valid_samples=0,
                            fully_parallel=cfg.checkpoint.ckpt_fully_parallel_save, model_only=True, keep_last=1)
    if rank() == 0:   # the folder is this writer's alone: leftovers of a crashed or later run go too
        for name in os.listdir(root):
            path = os.path.join(root, name)
            if name.startswith("iter_") and path != final and os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
    return final


def _adopt_saved_group_schedule(optimizer, loaded_optimizer_state) -> None:
    """Let megatron-core >= 0.19 find the saved param groups when --lr/--min-lr/--decoupled-lr changed.

    0.19 matches saved param groups to the current ones also by max_lr, min_lr, start_wd, end_wd
    (and optimizer): `param_group_identifier_keys` in optimizer/optimizer.py, so a changed value fails
    the load ("Could not find parameter group with key ..."; a KeyError in
    DistributedOptimizer.load_state_dict). 0.16 matched by the four `LEGACY_GROUP_KEYS` (`group_role`) and
    the saved group, with its saved max_lr/min_lr, replaced the current one. Same here: the current groups
    take the saved values of the extra keys before loading, so the groups match and the result is 0.16's;
    with --override-opt-param-scheduler the command line's rates come back after the load
    (`training.optimizer.load_scheduler_state`).
    """
    try:
        from megatron.core.optimizer.optimizer import param_group_identifier_keys
    except ImportError:
        return
    extra = [k for k in param_group_identifier_keys if k not in LEGACY_GROUP_KEYS]
    if not extra:
        return
    saved = {group_role(g): g for g in saved_param_groups(loaded_optimizer_state)}
    for group in param_groups(optimizer):
        match = saved.get(group_role(group))
        if match is not None:
            group.update({k: match[k] for k in extra if k in match})


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
            if rank() == 0:
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
    args = common.get("args")   # Megatron-LM's parsed flags (ours since the layout follows its)
    saved_layout = common.get("parallel_layout") or {
        "tp": getattr(args, "tensor_model_parallel_size", 1), "pp": getattr(args, "pipeline_model_parallel_size", 1)}
    layout = parallel_layout()
    same_layout = all(saved_layout.get(k) == layout[k] for k in ("tp", "pp"))
    model_only = bool(common.get("model_only", getattr(args, "no_save_optim", False))) \
        or getattr(state, "optimizer", None) is None
    load_optim = not (c.finetune or c.no_load_optim or model_only)
    load_rng = not (c.finetune or c.no_load_rng or model_only or getattr(args, "no_save_rng", False)) and same_layout
    metadata = _saved_metadata(common, path, resharding=not same_layout) if load_optim else {}
    if not same_layout and not (c.finetune or c.no_load_rng or model_only) and rank() == 0:
        warnings.warn(f"checkpoint {path} was saved with TP={saved_layout.get('tp')} PP={saved_layout.get('pp')}; "
                      f"loading into TP={layout['tp']} PP={layout['pp']}: RNG state not restored")
    if load_optim:
        check_same_param_groups(common.get("run_config"), cfg, path)
        prepare_optimizer_for_load(state.optimizer)
    sd = _state_dict(state, is_loading=True, with_optimizer=load_optim, with_rng=load_rng, metadata=metadata)
    loaded = load_sharded(sd, path)
    if load_optim:   # a schedule that differs from the checkpoint's fails before anything is loaded
        check_resumed_schedule(state, loaded["optimizer"], loaded["opt_param_scheduler"], cfg, path)
    load_model_state(state.model, loaded)
    if load_optim:
        fitted = _same_structure(loaded["optimizer"], sd["optimizer"])
        wanted = group_rates(state.optimizer)   # the command line's, for --override-opt-param-scheduler
        _adopt_saved_group_schedule(state.optimizer, fitted)
        state.optimizer.load_state_dict(fitted)
        load_scheduler_state(state, loaded["opt_param_scheduler"], cfg, wanted)
    if load_rng:
        why = _set_rng_state(loaded["rng_state"])
        if why is not None and rank() == 0:
            warnings.warn(f"checkpoint {path}: RNG state not restored: {why}")
    mark_loaded(path)
    if c.finetune or model_only:
        return LoadedCheckpoint(0, 0, 0, path, not same_layout)

    def counter(name: str) -> int:   # ours in the common state; Megatron-LM's in args
        return int(common[name] if name in common else getattr(args, name, 0))

    return LoadedCheckpoint(int(common["iteration"]), counter("consumed_train_samples"),
                            counter("consumed_valid_samples"), path, not same_layout,
                            float(common.get("num_floating_point_operations_so_far", 0)))


def _saved_metadata(common: dict, path: str, *, resharding: bool) -> dict:
    """The optimizer layout the checkpoint was saved in (its `content_metadata`, as Megatron-LM's loader
    reads it); {} for checkpoints without one: ours before it, written in `_state_dict`'s defaults
    (`fully_reshardable`, `chained_optim_avoid_prefix`).
    A layout that cannot change TP/PP (Megatron-LM's default `dp_reshardable`) is refused then."""
    from megatron.core.dist_checkpointing import load_content_metadata
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    saved = dict(load_content_metadata(preloaded_state_dict=common) or {})
    kind = saved.get("distrib_optim_sharding_type")
    if resharding and kind is not None and kind not in DistributedOptimizer.checkpoint_fully_reshardable_formats:
        raise CheckpointError(f"{path}: its distributed-optimizer state is saved as {kind!r}, which cannot be "
                              f"loaded into another tensor/pipeline-parallel layout; load it with the saved "
                              f"layout, or with --no-load-optim (weights only), or re-save it with "
                              f"'fully_reshardable' (Megatron-LM: --dist-ckpt-optim-fully-reshardable)")
    return saved
