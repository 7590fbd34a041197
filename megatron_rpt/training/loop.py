"""The pretraining driver: platform -> distributed -> model/optimizer -> data -> train/eval/save.

`pretrain(cfg)` is the whole job; the console script only parses flags and calls it. It returns a
`PretrainResult` (per-iteration losses, final iteration, where outputs went) for callers and tests.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional

from megatron_rpt.config.schedule import global_batch_size_at
from megatron_rpt.config.schema import RunConfig
from megatron_rpt.training.driver import SignalFlag, TrainingDriver
from megatron_rpt.training.setup import setup_job


@dataclass
class PretrainResult:
    iteration: int
    start_iteration: int
    losses: dict = field(default_factory=dict)         # iteration -> lm loss
    grad_norms: dict = field(default_factory=dict)
    lrs: dict = field(default_factory=dict)            # iteration -> learning rate after its step
    batch_sizes: dict = field(default_factory=dict)    # iteration -> global batch (--rampup-batch-size)
    valid_losses: dict = field(default_factory=dict)   # iteration -> validation loss
    distribution: dict = field(default_factory=dict)   # iteration -> loss statistics (logged steps)
    valid_distribution: dict = field(default_factory=dict)
    moe: dict = field(default_factory=dict)            # iteration -> router statistics (MoE, logged steps)
    params_norms: dict = field(default_factory=dict)   # iteration -> --log-params-norm (logged steps)
    num_zeros: dict = field(default_factory=dict)      # iteration -> --log-num-zeros-in-grad
    saved: list = field(default_factory=list)          # checkpoint folders written
    resumed_from: Optional[str] = None
    exit_reason: str = "train_iters"                  # or signal / exit_interval / exit_duration
    nonfinite_skipped: int = 0                         # updates skipped for NaN/inf gradients


class NonFiniteError(FloatingPointError):
    """Too many consecutive iterations with NaN/inf gradients (--nonfinite-grad-skip-limit)."""


def pretrain(cfg: RunConfig) -> PretrainResult:
    """Run (or resume) the pretraining job described by `cfg` on the current launcher's ranks."""
    start_time = time.time()  # --exit-duration-in-mins counts from here (set-up included, as Megatron-LM)
    # First of all, so that a preemption signal during set-up (model build, dataset indices: minutes
    # at scale) is remembered instead of killing the job: the loop saves and exits after step 1.
    signals = SignalFlag(cfg.training.exit_signal_handler)
    job = setup_job(cfg)
    from megatron.core import parallel_state

    from megatron_rpt import distributed as dist
    from megatron_rpt.data.datasets import MicroBatchIterator, build_datasets, require_validation_set
    from megatron_rpt.loss import get_loss_function
    from megatron_rpt.models.flops import peak_tflops_for_device
    from megatron_rpt.training.logging import MetricsLogger
    from megatron_rpt.training.moe_metrics import RouterMonitor
    from megatron_rpt.training.params_norm import params_l2_norm
    from megatron_rpt.training.sinks import writes_scalars
    from megatron_rpt.training.timers import TimerReport
    from megatron_rpt.training.step import evaluate, make_forward_step, train_step

    platform, env, device, tokenizer, state = job.platform, job.env, job.device, job.tokenizer, job.state
    t, m = cfg.training, cfg.model
    flops_per_token = job.flops_per_token

    driver = TrainingDriver(cfg, state, device, start_time=start_time, signals=signals, name="training")
    driver.flops_per_sample = flops_per_token * m.seq_length
    driver.resume()
    result = PretrainResult(iteration=driver.iteration, start_iteration=driver.iteration,
                            resumed_from=driver.resumed_from)

    datasets = build_datasets(cfg, tokenizer, create_attention_mask=not platform.transformer_engine,
                              check_tokens=False)
    # Evaluation asked for without validation data is an error, not a silent skip.
    require_validation_set(cfg, datasets)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp = parallel_state.get_data_parallel_world_size()
    n_chunks = len(state.model)
    loader = dict(num_workers=cfg.data.num_workers, pin_memory=platform.pin_memory)
    train_iters = [MicroBatchIterator(datasets.train, t.micro_batch_size, dp_rank, dp, driver.consumed_train, **loader)
                   for _ in range(n_chunks)]
    valid_iters: list = []     # built at the first evaluation and kept (its workers start once)
    num_micro = t.global_batch_size // (t.micro_batch_size * dp)   # evaluation's, and training's after a ramp-up
    loss_fn = get_loss_function(cfg, tokenizer.vocab_size)
    forward_step = make_forward_step(loss_fn, device)

    peak = cfg.logging.peak_tflops
    if peak is None and platform.device_type == "cuda":
        peak = peak_tflops_for_device(platform.gpu(env.local_rank).name)
    logger = MetricsLogger(
        log_interval=cfg.logging.log_interval, writer=driver.writer, tensorboard=writes_scalars(cfg),
        tensorboard_log_interval=cfg.logging.tensorboard_log_interval, train_iters=t.train_iters,
        global_batch_size=t.global_batch_size, seq_length=m.seq_length, flops_per_token=flops_per_token,
        world_size=env.world_size, peak_tflops=peak, device_type=platform.device_type,
        is_logging_rank=env.rank == 0, log_throughput=cfg.logging.log_throughput,
        log_memory=cfg.logging.log_memory, timers=TimerReport(state.config.timers, cfg.logging),
        log_validation_ppl=cfg.logging.log_validation_ppl_to_tensorboard)
    monitor = RouterMonitor(state.model, m.num_layers, num_micro) if m.num_experts else None
    step_kwargs = dict(num_microbatches=num_micro, seq_length=m.seq_length,
                       micro_batch_size=t.micro_batch_size, device=device,
                       empty_unused_memory_level=t.empty_unused_memory_level)

    def run_eval(iteration: int) -> None:
        if not valid_iters:
            valid_iters.extend(MicroBatchIterator(datasets.valid, t.micro_batch_size, dp_rank, dp, driver.consumed_valid,
                                                  cyclic=True, **loader) for _ in range(n_chunks))
        loss, tokens, stats = evaluate(state, valid_iters, forward_step, eval_iters=t.eval_iters, **step_kwargs)
        driver.consumed_valid = valid_iters[0].consumed_samples
        result.valid_losses[iteration] = loss
        if stats:
            result.valid_distribution[iteration] = stats
        logger.log_eval(iteration, loss, tokens, stats)

    consecutive_nonfinite = 0

    def train_one(iteration: int) -> None:
        nonlocal consecutive_nonfinite
        forward_step.collect_stats = logger.wants_stats(iteration)
        # --rampup-batch-size / --step-batch-size-schedule: this step's global batch is a function of the
        # consumed samples only, so every rank (and a resumed run) takes the same one; the scheduler advances by it.
        batch = global_batch_size_at(cfg, driver.consumed_train)
        micro = batch // (t.micro_batch_size * dp)
        if monitor is not None:
            monitor.num_microbatches = micro
        step = train_step(state, train_iters, forward_step, global_batch_size=batch, check_finite=not t.fp16,
                          **{**step_kwargs, "num_microbatches": micro})
        driver.consumed_train += batch
        if cfg.logging.log_params_norm and logger.wants_stats(iteration):   # collective, same steps everywhere
            step.params_norm = result.params_norms[iteration] = params_l2_norm(state.model, bf16=t.bf16, device=device)
        if step.num_zeros is not None:
            result.num_zeros[iteration] = step.num_zeros
        result.losses[iteration] = step.loss
        result.lrs[iteration], result.batch_sizes[iteration] = step.lr, batch
        if step.grad_norm is not None:
            result.grad_norms[iteration] = step.grad_norm
        if step.stats:
            result.distribution[iteration] = step.stats
        if monitor is not None:
            # A collective on logged steps only; the choice is the same on every rank.
            if logger.wants_stats(iteration):
                step.moe = monitor.collect()
                result.moe[iteration] = {k: ({layer: c.tolist() for layer, c in v.items()}
                                             if k == "tokens_per_expert" else v) for k, v in step.moe.items()}
            else:
                monitor.discard()
        logger.record(iteration, step, driver.consumed_train, batch)
        if step.nonfinite:
            result.nonfinite_skipped += 1
            consecutive_nonfinite += 1
            dist.print_rank_0(f"> iteration {iteration}: NaN/inf in the gradients (lm loss {step.loss}); update "
                              f"skipped ({consecutive_nonfinite} in a row, {result.nonfinite_skipped} in all)")
            if consecutive_nonfinite > t.nonfinite_grad_skip_limit:
                raise NonFiniteError(
                    f"iteration {iteration}: {consecutive_nonfinite} consecutive iterations with NaN/inf gradients "
                    f"(--nonfinite-grad-skip-limit {t.nonfinite_grad_skip_limit}); stopping. The last "
                    f"checkpoint is intact: lower --lr, check the data or the loss settings, and resume")
        else:
            consecutive_nonfinite = 0
        if not math.isfinite(step.loss) and step.update_successful:
            raise FloatingPointError(f"iteration {iteration}: lm loss is {step.loss} with finite gradients")

    try:
        result.iteration = driver.run(train_one, evaluate=run_eval if t.eval_iters > 0 else None)
    finally:
        result.saved, result.exit_reason = driver.saved, driver.exit_reason
        driver.close()
        for it in train_iters + valid_iters:
            it.close()
        if monitor is not None:
            monitor.close()
    return result
