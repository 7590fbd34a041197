"""Model wrapping (Float16Module, DDP), the Megatron optimizer and the LR / weight-decay schedule.

Everything here is Megatron-Core's own machinery configured from `RunConfig`: DistributedDataParallel
with contiguous grad buffers, `get_megatron_optimizer` (AdamW, optionally the distributed optimizer)
and `OptimizerParamScheduler` (constant, linear, cosine, inverse-square-root, WSD).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import Float16Module

from megatron_rpt.config.schema import RunConfig
from megatron_rpt.models.gpt import params_dtype


@dataclass
class TrainState:
    """The trainable objects of a run (model chunks are DDP-wrapped)."""

    model: list
    optimizer: object
    scheduler: OptimizerParamScheduler
    config: TransformerConfig


def wrap_model(chunks: list, cfg: RunConfig, config: TransformerConfig) -> list:
    """Float16Module for bf16/fp16, then DDP with Megatron's contiguous gradient buffers."""
    p = cfg.parallel
    if cfg.training.bf16 or cfg.training.fp16:
        chunks = [Float16Module(config, c) for c in chunks]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather,
        use_distributed_optimizer=p.use_distributed_optimizer,
        fp8_param_gather=cfg.fp8.fp8_param_gather,
        # bf16/fp32: NaN/inf gradients skip the update (training.step.grads_are_finite, counted and
        # limited by --nonfinite-grad-skip-limit) instead of Megatron-Core raising before the DP
        # reduction; fp16 keeps the check beside its loss scaler (which handles inf).
        check_for_nan_in_grad=cfg.training.fp16,
        bucket_size=None,
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        # Only the first chunk may start bucketing late (Megatron-LM does the same for VPP).
        wrapped.append(DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
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
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        sgd_momentum=o.sgd_momentum,
        clip_grad=o.clip_grad,
        bf16=t.bf16,
        fp16=t.fp16,
        params_dtype=params_dtype(cfg),
        use_distributed_optimizer=p.use_distributed_optimizer,
        overlap_param_gather=p.overlap_param_gather,
        log_num_zeros_in_grad=cfg.logging.log_num_zeros_in_grad,
        barrier_with_L1_time=cfg.logging.barrier_with_L1_time,
    )


def build_scheduler(optimizer, cfg: RunConfig) -> OptimizerParamScheduler:
    """LR schedule in samples, as Megatron-LM counts it (steps x global batch)."""
    o, t = cfg.optimizer, cfg.training
    gbs = t.global_batch_size
    return OptimizerParamScheduler(
        optimizer,
        init_lr=o.lr_warmup_init,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.lr_warmup_iters * gbs,
        lr_decay_steps=o.lr_decay_iters * gbs,
        lr_decay_style=o.lr_decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=t.train_iters * gbs,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
        wsd_decay_steps=(o.lr_wsd_decay_iters * gbs) if o.lr_wsd_decay_iters else None,
        lr_wsd_decay_style=o.lr_wsd_decay_style,
    )


def setup_model_and_optimizer(chunks: list, cfg: RunConfig, config: TransformerConfig) -> TrainState:
    """Wrap `chunks`, build optimizer + scheduler, and wire Megatron's schedule hooks into `config`."""
    model = wrap_model(chunks, cfg, config)
    opt_config = megatron_optimizer_config(cfg)
    opt_config.timers = config.timers  # the job's one Timers (training.timers), as Megatron-LM sets it
    optimizer = get_megatron_optimizer(opt_config, model)
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
