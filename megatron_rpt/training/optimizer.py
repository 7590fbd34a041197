"""Model wrapping (Float16Module, DDP), the Megatron optimizer and the LR / weight-decay schedule.

Everything here is Megatron-Core's own machinery configured from `RunConfig`: DistributedDataParallel
with contiguous grad buffers, `get_megatron_optimizer` (AdamW, optionally the distributed optimizer)
and `OptimizerParamScheduler` (constant, linear, cosine, inverse-square-root, WSD).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import Float16Module

from megatron_rpt.config.schedule import lr_schedule
from megatron_rpt.config.schema import RunConfig
from megatron_rpt.models.gpt import params_dtype


@dataclass
class TrainState:
    """The trainable objects of a run (model chunks are DDP-wrapped)."""

    model: list
    optimizer: object
    scheduler: OptimizerParamScheduler
    config: TransformerConfig
    # more training state saved with the checkpoint under its own key (RLP's EMA teacher; see
    # training.checkpointing.load_extra_state)
    checkpoint_extras: list = field(default_factory=list)


def ddp_config(cfg: RunConfig) -> DistributedDataParallelConfig:
    """Megatron-Core DDP's configuration of a run: contiguous grad buffers, one bucket."""
    p = cfg.parallel
    return DistributedDataParallelConfig(
        # Megatron-LM: --bf16 accumulates and reduces in fp32 unless --grad-reduce-in-bf16 (validation refuses
        # the flag without --bf16; fp32 and fp16 runs reduce in fp32 here).
        grad_reduce_in_fp32=not cfg.training.grad_reduce_in_bf16,
        overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather,
        use_distributed_optimizer=p.use_distributed_optimizer,
        fp8_param_gather=cfg.fp8.fp8_param_gather,
        # No NaN check before the DP reduction: bf16/fp32 skip the update of NaN/inf gradients
        # (training.step.grads_are_finite, counted and limited by --nonfinite-grad-skip-limit), and under fp16
        # NaN/inf gradients are the dynamic loss scaler's signal (Megatron-LM turns the check off there too;
        # with it on, the first overflow of the initial 2^32 scale ended the run).
        check_for_nan_in_grad=False,
        bucket_size=None,
    )


def wrap_model(chunks: list, cfg: RunConfig, config: TransformerConfig) -> list:
    """Float16Module for bf16/fp16, then DDP with Megatron's contiguous gradient buffers."""
    if cfg.training.bf16 or cfg.training.fp16:
        chunks = [Float16Module(config, c) for c in chunks]
    ddp = ddp_config(cfg)
    wrapped = []
    for i, chunk in enumerate(chunks):
        # Only the first chunk may start bucketing late (Megatron-LM does the same for VPP).
        wrapped.append(DistributedDataParallel(config=config, ddp_config=ddp, module=chunk,
                                               disable_bucketing=i > 0))
    for m in wrapped:
        m.broadcast_params()
    return wrapped


def megatron_optimizer_config(cfg: RunConfig) -> MegatronOptimizerConfig:
    o, t, p = cfg.optimizer, cfg.training, cfg.parallel
    return MegatronOptimizerConfig(
        optimizer=o.optimizer,
        lr=o.lr,
        min_lr=o.min_lr,
        # The embedding / output layer parameter group (Megatron-Core's get_standard_config_overrides).
        decoupled_lr=o.decoupled_lr,
        decoupled_min_lr=o.decoupled_min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        sgd_momentum=o.sgd_momentum,
        clip_grad=o.clip_grad,
        loss_scale=o.loss_scale,
        initial_loss_scale=o.initial_loss_scale,
        min_loss_scale=o.min_loss_scale,
        loss_scale_window=o.loss_scale_window,
        hysteresis=o.hysteresis,
        bf16=t.bf16,
        fp16=t.fp16,
        params_dtype=params_dtype(cfg),
        use_distributed_optimizer=p.use_distributed_optimizer,
        overlap_param_gather=p.overlap_param_gather,
        log_num_zeros_in_grad=cfg.logging.log_num_zeros_in_grad,
        barrier_with_L1_time=cfg.logging.barrier_with_L1_time,
    )


def build_scheduler(optimizer, cfg: RunConfig) -> OptimizerParamScheduler:
    """LR / weight-decay schedule in samples, as Megatron-LM counts it (`config.schedule.lr_schedule`:
    iterations x global batch, or the sample flags); `step(increment)` takes the step's global batch."""
    o = cfg.optimizer
    steps = lr_schedule(cfg)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=o.lr_warmup_init,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=steps.warmup,
        lr_decay_steps=steps.decay,
        lr_decay_style=o.lr_decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=steps.wd_incr,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=o.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=o.override_opt_param_scheduler,
        wsd_decay_steps=steps.wsd_decay,
        lr_wsd_decay_style=o.lr_wsd_decay_style,
    )


def param_groups(optimizer) -> list:
    """Every param group of a Megatron optimizer (each optimizer of a chain)."""
    return [g for opt in getattr(optimizer, "chained_optimizers", [optimizer])
            for g in getattr(getattr(opt, "optimizer", None), "param_groups", [])]


# megatron-core 0.16's `param_group_identifier_keys` (optimizer/optimizer.py): how a saved param group is
# matched to the current one on load.
LEGACY_GROUP_KEYS = ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr")


def group_role(group: dict) -> tuple:
    """What a param group is for, independent of its learning rates: its `LEGACY_GROUP_KEYS` (with
    'is_decoupled_lr' marked by `setup_model_and_optimizer`)."""
    return tuple(group.get(k, group.get(f"pre_{k}")) for k in LEGACY_GROUP_KEYS)


# What Megatron-Core's OptimizerParamScheduler.load_state_dict compares with the checkpoint (its state
# dict's keys) and the flags that set them. wd_incr_steps is left out: the weight decay is constant here
# (start = end = --weight-decay), so the increment length changes nothing.
_SCHEDULER_SETTINGS = {
    "max_lr": "--lr", "min_lr": "--min-lr",
    "lr_warmup_steps": "the warmup in samples (--lr-warmup-iters x global batch, --lr-warmup-samples or "
                       "--lr-warmup-fraction)",
    "lr_decay_steps": "the decay in samples (--lr-decay-iters x global batch or --lr-decay-samples; default "
                      "--train-iters / --train-samples)",
    "lr_decay_style": "--lr-decay-style", "start_wd": "--weight-decay",
}
_RESUME_FLAGS = ("pass --override-opt-param-scheduler to train with the command line's schedule (continuing from "
                 "the checkpoint's step count) or --use-checkpoint-opt_param-scheduler to keep the checkpoint's; "
                 "to start a new job from its weights (e.g. RPT or RLVR after pretraining), --finetune")


def check_same_param_groups(saved_run_config: dict, cfg: RunConfig, path: str) -> None:
    """Before a resume reads the optimizer: turning --decoupled-lr on or off changes the optimizer's param
    groups, which Megatron-Core cannot load (dist_checkpointing fails merging lists of different lengths)."""
    from megatron_rpt.config.validation import ConfigError
    saved = (saved_run_config or {}).get("optimizer", {})
    on = cfg.optimizer.decoupled_lr is not None
    if "decoupled_lr" in saved and (saved["decoupled_lr"] is not None) != on:
        raise ConfigError([f"--decoupled-lr is {'given' if on else 'not given'} but the checkpoint {path} was saved "
                           f"{'without' if on else 'with'} it: the optimizer's parameter groups differ; resume with "
                           "the same setting, or with --no-load-optim (weights only, fresh optimizer)"])


def check_resumed_schedule(state, saved_optimizer: dict, saved_scheduler: dict, cfg: RunConfig, path: str) -> None:
    """Before a resume loads anything: without --override-opt-param-scheduler or
    --use-checkpoint-opt_param-scheduler, a schedule setting that differs from the checkpoint's is one
    ConfigError naming each (Megatron-Core's scheduler would assert on the first, without the flags' names);
    the --decoupled-lr groups' rates are compared too."""
    from megatron_rpt.config.validation import ConfigError
    o = cfg.optimizer
    if o.override_opt_param_scheduler or o.use_checkpoint_opt_param_scheduler:
        return
    problems = []
    ours = state.scheduler.state_dict()
    for key, flag in _SCHEDULER_SETTINGS.items():
        if key in saved_scheduler and saved_scheduler[key] != ours[key]:
            problems.append(f"resuming from {path}: {flag} is {ours[key]} on the command line but "
                            f"{saved_scheduler[key]} in the checkpoint; {_RESUME_FLAGS}")
    saved = {group_role(g): g for g in saved_param_groups(saved_optimizer)}
    for group in param_groups(state.optimizer):
        role = group_role(group)
        for key, flag in (("max_lr", "--decoupled-lr"), ("min_lr", "--decoupled-min-lr")):
            if role[3] and role in saved and saved[role].get(key) != group.get(key):
                problem = (f"resuming from {path}: {flag} is {group.get(key)} on the command line but "
                           f"{saved[role].get(key)} in the checkpoint; {_RESUME_FLAGS}")
                problems += [problem] if problem not in problems else []
    if problems:
        raise ConfigError(problems)


def saved_param_groups(saved_optimizer) -> list:
    """The param groups (dicts) anywhere in a loaded optimizer state."""
    found = []

    def walk(d):
        if isinstance(d, dict):
            for key, value in d.items():
                if key == "param_groups" and isinstance(value, list):
                    found.extend(g for g in value if isinstance(g, dict))
                else:
                    walk(value)
    walk(saved_optimizer)
    return found


def load_scheduler_state(state, saved_scheduler: dict, cfg: RunConfig, wanted: dict) -> None:
    """Load the checkpoint's scheduler after its optimizer (whose param groups now carry the checkpoint's
    max_lr/min_lr). --override-opt-param-scheduler: the param groups take back the command line's rates
    (`wanted`: role -> (max_lr, min_lr), read before the load) and the scheduler its settings; otherwise the
    checkpoint's (equal to the command line's unless --use-checkpoint-opt_param-scheduler). The step count is
    always the checkpoint's, and the scheduler's step sets every group's lr from it."""
    if cfg.optimizer.override_opt_param_scheduler:
        for group in param_groups(state.optimizer):
            if group_role(group) in wanted:
                group["max_lr"], group["min_lr"] = wanted[group_role(group)]
    # Megatron-Core also compares wd_incr_steps (--train-iters x global batch): meaningless for a constant
    # weight decay, and a longer --train-iters must not make a resume fail on it.
    state.scheduler.load_state_dict({**saved_scheduler, "wd_incr_steps": state.scheduler.wd_incr_steps})


def group_rates(optimizer) -> dict:
    """role -> (max_lr, min_lr) of the optimizer's param groups (the command line's, before a load)."""
    return {group_role(g): (g.get("max_lr"), g.get("min_lr")) for g in param_groups(optimizer)}


def setup_model_and_optimizer(chunks: list, cfg: RunConfig, config: TransformerConfig) -> TrainState:
    """Wrap `chunks`, build optimizer + scheduler, and wire Megatron's schedule hooks into `config`."""
    model = wrap_model(chunks, cfg, config)
    opt_config = megatron_optimizer_config(cfg)
    opt_config.timers = config.timers  # the job's one Timers (training.timers), as Megatron-LM sets it
    optimizer = get_megatron_optimizer(opt_config, model)
    # Megatron-Core (0.16, 0.19) leaves 'is_decoupled_lr' False on the --decoupled-lr groups, and 0.16
    # identifies a checkpoint's param groups by (wd_mult, lr_mult, is_expert_parallel, is_decoupled_lr) only
    # (optimizer.py _filter_and_reorder_param_groups): the embedding/output group then collides with the
    # default one and a resume fails ("doesn't match the size of optimizer's group"). Marking the groups whose
    # learning rate is overridden (default_config False) keeps them apart in both versions.
    for group in param_groups(optimizer):
        group["is_decoupled_lr"] = not group.get("default_config", True)
    scheduler = build_scheduler(optimizer, cfg)
    # Hooks the forward/backward schedules call (Megatron-LM sets the same ones in training.py).
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    no_sync = [m.no_sync for m in model]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    if cfg.parallel.overlap_grad_reduce:
        grad_sync = [m.start_grad_sync for m in model]
        config.grad_sync_func = grad_sync[0] if len(grad_sync) == 1 else grad_sync
    if cfg.parallel.overlap_param_gather and cfg.parallel.use_distributed_optimizer:
        param_sync = [m.start_param_sync for m in model]
        config.param_sync_func = param_sync[0] if len(param_sync) == 1 else param_sync
    return TrainState(model=model, optimizer=optimizer, scheduler=scheduler, config=config)
