"""The training schedule in samples, as Megatron-LM counts it: iteration- or sample-based flags ->
the optimizer-step count, the learning-rate / weight-decay schedule in samples, and the global batch of
each step under --rampup-batch-size.

Pure functions of the configuration (no torch), shared by validation (which resolves
`training.train_iters` once, from --train-samples where given), the scheduler
(`training.optimizer.build_scheduler`), the pretraining loop and the dry run.

Semantics (Megatron-LM `training.py` get_optimizer_param_scheduler / update_train_iters; the ramp-up is
Megatron-Core 0.16's RampupBatchsizeNumMicroBatchesCalculator: 0.19 keeps the argument but ignores it,
Megatron-LM replaced it by --step-batch-size-schedule in April 2026):
- iteration-based: steps = iterations x --global-batch-size; decay defaults to --train-iters;
- sample-based: steps are the sample flags; decay defaults to --train-samples; --train-iters is
  train samples // global batch, or with ramp-up the iterations of Megatron-LM's loop (ramp-up phase
  while consumed <= ramp-up samples and <= train samples, then whole global batches; the last partial
  one is dropped, while the ramp-up phase's last step may end past --train-samples, both as Megatron-LM);
- --lr-warmup-fraction: warmup = fraction x decay steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Rampup:
    """--rampup-batch-size START INCR SAMPLES towards the final global batch `final`."""

    start: int
    increment: int
    samples: int
    final: int

    def batch_size(self, consumed_samples: int) -> int:
        """The global batch of the step that starts after `consumed_samples` samples (Megatron-Core 0.16
        `RampupBatchsizeNumMicroBatchesCalculator.update`): START + INCR x int(consumed / (SAMPLES /
        increments)) up to SAMPLES, the final batch after."""
        if consumed_samples > self.samples:
            return self.final
        per_increment = self.samples / ((self.final - self.start) // self.increment)
        return self.start + int(consumed_samples / per_increment) * self.increment


def rampup(cfg) -> Optional[Rampup]:
    """The run's ramp-up, or None (a fixed global batch)."""
    r = cfg.training.rampup_batch_size
    return Rampup(int(r[0]), int(r[1]), int(r[2]), cfg.training.global_batch_size) if r else None


def global_batch_size_at(cfg, consumed_samples: int) -> int:
    """The global batch of the step starting after `consumed_samples` (a pure function of the counter,
    so every rank and every resume agree)."""
    ramp = rampup(cfg)
    return cfg.training.global_batch_size if ramp is None else ramp.batch_size(consumed_samples)


def samples_after(cfg, iterations: int) -> int:
    """The samples `iterations` optimizer steps consume from the start."""
    ramp = rampup(cfg)
    if ramp is None:
        return iterations * cfg.training.global_batch_size
    consumed = 0
    for done in range(iterations):
        if consumed > ramp.samples:   # the rest are whole global batches
            return consumed + (iterations - done) * ramp.final
        consumed += ramp.batch_size(consumed)
    return consumed


def iterations_for_samples(train_samples: int, global_batch_size: int, ramp: Optional[Rampup] = None) -> int:
    """Megatron-LM's `update_train_iters`: the optimizer steps of a sample-based run."""
    if ramp is None:
        return train_samples // global_batch_size
    iterations = consumed = 0
    while consumed <= ramp.samples and consumed <= train_samples:
        consumed += ramp.batch_size(consumed)
        iterations += 1
    if train_samples > consumed:
        iterations += (train_samples - consumed) // global_batch_size
    return iterations


@dataclass(frozen=True)
class LRSchedule:
    """OptimizerParamScheduler's step counts, in samples."""

    warmup: float
    decay: int
    wsd_decay: Optional[int]
    wd_incr: int


def lr_schedule(cfg) -> LRSchedule:
    """The learning-rate / weight-decay schedule in samples (see the module docstring); needs the derived
    global batch and, iteration-based, --train-iters."""
    o, t = cfg.optimizer, cfg.training
    if t.train_samples is None:
        gbs = t.global_batch_size
        decay = (o.lr_decay_iters if o.lr_decay_iters is not None else t.train_iters) * gbs
        wsd = o.lr_wsd_decay_iters * gbs if o.lr_wsd_decay_iters is not None else None
        warmup = o.lr_warmup_iters * gbs
        wd_incr = t.train_iters * gbs
    else:
        decay = o.lr_decay_samples if o.lr_decay_samples is not None else t.train_samples
        wsd, warmup, wd_incr = o.lr_wsd_decay_samples, o.lr_warmup_samples, t.train_samples
    if o.lr_warmup_fraction is not None:
        warmup = o.lr_warmup_fraction * decay
    return LRSchedule(warmup=warmup, decay=decay, wsd_decay=wsd, wd_incr=wd_incr)


def schedule_summary(cfg) -> str:
    """How --train-iters was resolved and the LR schedule in samples, for the start-up banner and --dry-run
    ('' for an iteration-based run without ramp-up)."""
    t = cfg.training
    if t.train_samples is None:
        return ""
    ramp, sched = rampup(cfg), lr_schedule(cfg)
    text = f" (from --train-samples {t.train_samples}"
    if ramp is not None:
        text += (f"; batch ramp-up {ramp.start} -> {ramp.final} by {ramp.increment} over {ramp.samples} samples")
    return text + (f"; LR warmup {sched.warmup:.12g}, decay {sched.decay}"
                   + (f", WSD decay {sched.wsd_decay}" if sched.wsd_decay is not None else "") + " samples)")
