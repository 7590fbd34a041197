"""The pretraining driver: platform -> distributed -> model/optimizer -> data -> train/eval/save.

`pretrain(cfg)` is the whole job; the console script only parses flags and calls it. It returns a
`PretrainResult` (per-iteration losses, final iteration, where outputs went) for callers and tests.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_rpt.config.schema import RunConfig
from megatron_rpt.training.setup import setup_job


@dataclass
class PretrainResult:
    iteration: int
    start_iteration: int
    losses: dict = field(default_factory=dict)         # iteration -> lm loss
    grad_norms: dict = field(default_factory=dict)
    valid_losses: dict = field(default_factory=dict)   # iteration -> validation loss
    distribution: dict = field(default_factory=dict)   # iteration -> loss statistics (logged steps)
    valid_distribution: dict = field(default_factory=dict)
    moe: dict = field(default_factory=dict)            # iteration -> router statistics (MoE, logged steps)
    saved: list = field(default_factory=list)          # checkpoint folders written
    resumed_from: Optional[str] = None
    exit_reason: str = "train_iters"                  # or signal / exit_interval / exit_duration
    nonfinite_skipped: int = 0                         # updates skipped for NaN/inf gradients


class _SignalFlag:
    """Remembers SIGTERM/SIGUSR1 (SLURM preemption) so the loop saves and exits between iterations."""

    def __init__(self, enabled: bool):
        self.received: Optional[int] = None
        if enabled:
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, self._handler)

    def _handler(self, signum, frame):  # noqa: ARG002
        self.received = signum


def _any_rank(flags: list, device: torch.device) -> list:
    """Element-wise OR of per-rank flags (one MAX all-reduce), so every rank decides alike."""
    t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


class ExitWatch:
    """When a training loop must stop between iterations: a signal (--exit-signal-handler), the run
    time (--exit-duration-in-mins, from `start_time`) or --exit-interval. Signal and time are agreed
    by one MAX all-reduce, and only when they can end the run, so every rank stops at the same
    iteration."""

    def __init__(self, training, start_time: float, signals: _SignalFlag, device: torch.device):
        self.t, self.start_time, self.signals, self.device = training, start_time, signals, device
        self.collective = training.exit_signal_handler or bool(training.exit_duration_in_mins)

    def reason(self, iteration: int) -> Optional[str]:
        """'signal', 'exit_duration', 'exit_interval' or None (collective when signals or time are watched)."""
        t = self.t
        if self.collective:
            out_of_time = bool(t.exit_duration_in_mins) and time.time() - self.start_time > 60 * t.exit_duration_in_mins
            signalled, timed_out = _any_rank([self.signals.received is not None, out_of_time], self.device)
            if signalled:
                return "signal"
            if timed_out:
                return "exit_duration"
        if t.exit_interval and iteration % t.exit_interval == 0:
            return "exit_interval"
        return None


class NonFiniteError(FloatingPointError):
    """Too many consecutive iterations with NaN/inf gradients (--nonfinite-grad-skip-limit)."""


def pretrain(cfg: RunConfig) -> PretrainResult:
    """Run (or resume) the pretraining job described by `cfg` on the current launcher's ranks."""
    start_time = time.time()  # --exit-duration-in-mins counts from here (set-up included, as Megatron-LM)
    # First of all, so that a preemption signal during set-up (model build, dataset indices: minutes
    # at scale) is remembered instead of killing the job: the loop saves and exits after step 1.
    signals = _SignalFlag(cfg.training.exit_signal_handler)
    job = setup_job(cfg)
    from megatron.core import parallel_state

    from megatron_rpt import distributed as dist
    from megatron_rpt.data.datasets import MicroBatchIterator, build_datasets, require_validation_set
    from megatron_rpt.loss import get_loss_function
    from megatron_rpt.models.flops import peak_tflops_for_device
    from megatron_rpt.training.checkpointing import load_checkpoint, save_checkpoint
    from megatron_rpt.training.logging import MetricsLogger
    from megatron_rpt.training.moe_metrics import RouterMonitor
    from megatron_rpt.training.step import evaluate, make_forward_step, train_step

    platform, env, device, tokenizer, state = job.platform, job.env, job.device, job.tokenizer, job.state
    t, m = cfg.training, cfg.model
    flops_per_token = job.flops_per_token

    result = PretrainResult(iteration=0, start_iteration=0)
    consumed_train = consumed_valid = 0
    if cfg.checkpoint.load:
        loaded = load_checkpoint(cfg.checkpoint.load, state, cfg, iteration=cfg.checkpoint.ckpt_step)
        if loaded is not None:
            result.iteration = result.start_iteration = loaded.iteration
            consumed_train, consumed_valid = loaded.consumed_train_samples, loaded.consumed_valid_samples
            result.resumed_from = loaded.path
            dist.print_rank_0(f"> resumed from {loaded.path} at iteration {loaded.iteration} "
                              f"(consumed samples {consumed_train}){' [resharded]' if loaded.resharded else ''}")
        else:
            dist.print_rank_0(f"> no checkpoint in {cfg.checkpoint.load}; starting from scratch")

    datasets = build_datasets(cfg, tokenizer, create_attention_mask=not platform.transformer_engine,
                              check_tokens=False)
    # Evaluation asked for without validation data is an error, not a silent skip.
    require_validation_set(cfg, datasets)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp = parallel_state.get_data_parallel_world_size()
    n_chunks = len(state.model)
    train_iters = [MicroBatchIterator(datasets.train, t.micro_batch_size, dp_rank, dp, consumed_train)
                   for _ in range(n_chunks)]
    num_micro = t.global_batch_size // (t.micro_batch_size * dp)
    loss_fn = get_loss_function(cfg, tokenizer.vocab_size)
    forward_step = make_forward_step(loss_fn, device)

    peak = cfg.logging.peak_tflops
    if peak is None and platform.device_type == "cuda":
        peak = peak_tflops_for_device(platform.gpu(env.local_rank).name)
    logger = MetricsLogger(
        log_interval=cfg.logging.log_interval, tensorboard_dir=cfg.logging.tensorboard_dir,
        tensorboard_log_interval=cfg.logging.tensorboard_log_interval, train_iters=t.train_iters,
        global_batch_size=t.global_batch_size, seq_length=m.seq_length, flops_per_token=flops_per_token,
        world_size=env.world_size, peak_tflops=peak, device_type=platform.device_type,
        is_logging_rank=env.rank == 0, log_throughput=cfg.logging.log_throughput,
        log_memory=cfg.logging.log_memory)
    monitor = RouterMonitor(state.model, m.num_layers, num_micro) if m.num_experts else None
    step_kwargs = dict(num_microbatches=num_micro, seq_length=m.seq_length,
                       micro_batch_size=t.micro_batch_size, device=device)

    def save(iteration: int) -> None:
        if cfg.checkpoint.save:
            t0 = time.perf_counter()
            path = save_checkpoint(cfg.checkpoint.save, iteration, state, cfg,
                                   consumed_train_samples=consumed_train, consumed_valid_samples=consumed_valid,
                                   fully_parallel=cfg.checkpoint.ckpt_fully_parallel_save)
            result.saved.append(path)
            dist.print_rank_0(f"> saved checkpoint {path} ({time.perf_counter() - t0:.1f} s)")

    def run_eval(iteration: int) -> None:
        nonlocal consumed_valid
        iters = [MicroBatchIterator(datasets.valid, t.micro_batch_size, dp_rank, dp, consumed_valid, cyclic=True)
                 for _ in range(n_chunks)]
        loss, tokens, stats = evaluate(state, iters, forward_step, eval_iters=t.eval_iters, **step_kwargs)
        consumed_valid = iters[0].consumed_samples
        result.valid_losses[iteration] = loss
        if stats:
            result.valid_distribution[iteration] = stats
        logger.log_eval(iteration, loss, tokens, stats)

    iteration = result.iteration
    last_saved = iteration if result.resumed_from else None
    consecutive_nonfinite = 0
    exit_watch = ExitWatch(t, start_time, signals, device)
    try:
        while iteration < t.train_iters:
            forward_step.collect_stats = logger.wants_stats(iteration + 1)
            step = train_step(state, train_iters, forward_step, global_batch_size=t.global_batch_size,
                              check_finite=not t.fp16, **step_kwargs)
            iteration += 1
            consumed_train += t.global_batch_size
            result.losses[iteration] = step.loss
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
            logger.record(iteration, step, consumed_train)
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
            if t.eval_interval and iteration % t.eval_interval == 0 and t.eval_iters > 0:
                run_eval(iteration)
            if cfg.checkpoint.save_interval and iteration % cfg.checkpoint.save_interval == 0:
                save(iteration)
                last_saved = iteration
            reason = exit_watch.reason(iteration)
            if reason is not None:
                result.exit_reason = reason
                break
        result.iteration = iteration
        if cfg.checkpoint.save and last_saved != iteration:
            save(iteration)
        dist.print_rank_0(f"> training stopped at iteration {iteration} ({result.exit_reason})")
    finally:
        logger.close()
        if monitor is not None:
            monitor.close()
    return result

