"""The training schedule in samples, as Megatron-LM counts it: iteration- or sample-based flags ->
the optimizer-step count, the learning-rate / weight-decay schedule in samples, and the global batch of
each step under --rampup-batch-size or --step-batch-size-schedule.

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
- --step-batch-size-schedule "THRESHOLD:BATCH ..." (Megatron-Core 0.19's StepBatchsizeNumMicroBatchesCalculator,
  as Megatron-LM initialises it with the sequence length): thresholds are tokens (suffixes K, M, B, T), turned
  into samples by // --seq-length; a step's batch is that of the last threshold <= the consumed samples; the
  last entry's batch is the global batch (the LR schedule of an iteration-based run counts it); a sample-based
  run takes steps while consumed < --train-samples (its last step may end past it, as Megatron-LM's loop).
"""

from __future__ import annotations

import functools
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

    def settled(self, consumed_samples: int) -> bool:
        """Whether every step from `consumed_samples` on takes the final batch."""
        return consumed_samples > self.samples


@dataclass(frozen=True)
class StepSchedule:
    """--step-batch-size-schedule: (threshold in samples, global batch) pairs, thresholds ascending from 0."""

    steps: tuple

    @property
    def final(self) -> int:
        return self.steps[-1][1]

    def batch_size(self, consumed_samples: int) -> int:
        return [batch for threshold, batch in self.steps if threshold <= consumed_samples][-1]

    def settled(self, consumed_samples: int) -> bool:
        return consumed_samples >= self.steps[-1][0]


_SUFFIX = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


def _count(text: str) -> int:
    text = text.strip().upper()
    scale = _SUFFIX.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


@functools.lru_cache(maxsize=8)
def parse_step_schedule(text: str, seq_length: int) -> StepSchedule:
    """"THRESHOLD:BATCH ..." (tokens; commas or spaces between entries) -> a StepSchedule in samples;
    ValueError naming the problem (Megatron-Core asserts the same rules). Cached: the loop asks for
    each step's batch (`global_batch_size_at`), and the result is immutable."""
    flag = f"--step-batch-size-schedule {text!r}"
    steps = []
    for entry in text.replace(",", " ").split():
        threshold, colon, batch = entry.partition(":")
        try:
            if not colon:
                raise ValueError
            steps.append((_count(threshold) // seq_length, _count(batch)))
        except ValueError:
            raise ValueError(f"{flag}: entry {entry!r} is not THRESHOLD:BATCH (tokens, optional K/M/B/T suffix, "
                             "e.g. '0:16 2.4B:320')") from None
    steps.sort()
    if not steps or steps[0][0] != 0:
        raise ValueError(f"{flag}: the first threshold must be 0 (the batch the run starts with)")
    for (a, _), (b, _) in zip(steps, steps[1:]):
        if a == b:
            raise ValueError(f"{flag}: thresholds must be distinct in samples (tokens // --seq-length {seq_length}); "
                             f"two entries start at sample {a}")
    if any(batch < 1 for _, batch in steps):
        raise ValueError(f"{flag}: every batch must be >= 1")
    return StepSchedule(tuple(steps))


def rampup(cfg) -> Optional[Rampup]:
    """The run's ramp-up, or None."""
    r = cfg.training.rampup_batch_size
    return Rampup(int(r[0]), int(r[1]), int(r[2]), cfg.training.global_batch_size) if r else None


def batch_schedule(cfg):
    """The run's varying global batch (a Rampup or a StepSchedule), or None (a fixed global batch)."""
    t = cfg.training
    if t.step_batch_size_schedule:
        return parse_step_schedule(t.step_batch_size_schedule, cfg.model.seq_length)
    return rampup(cfg)


def global_batch_size_at(cfg, consumed_samples: int) -> int:
    """The global batch of the step starting after `consumed_samples` (a pure function of the counter,
    so every rank and every resume agree)."""
    schedule = batch_schedule(cfg)
    return cfg.training.global_batch_size if schedule is None else schedule.batch_size(consumed_samples)


def samples_after(cfg, iterations: int) -> int:
    """The samples `iterations` optimizer steps consume from the start."""
    schedule = batch_schedule(cfg)
    if schedule is None:
        return iterations * cfg.training.global_batch_size
    consumed = 0
    for done in range(iterations):
        if schedule.settled(consumed):   # the rest are whole global batches
            return consumed + (iterations - done) * schedule.final
        consumed += schedule.batch_size(consumed)
    return consumed


def iterations_for_samples(train_samples: int, global_batch_size: int, schedule=None) -> int:
    """Megatron-LM's `update_train_iters`: the optimizer steps of a sample-based run (`schedule`: the run's
    `batch_schedule`, None for a fixed batch)."""
    if schedule is None:
        return train_samples // global_batch_size
    iterations = consumed = 0
    if isinstance(schedule, StepSchedule):   # while consumed < train samples: one more step
        while consumed < train_samples and not schedule.settled(consumed):
            consumed += schedule.batch_size(consumed)
            iterations += 1
        return iterations + max(0, -(-(train_samples - consumed) // schedule.final))
    while consumed <= schedule.samples and consumed <= train_samples:
        consumed += schedule.batch_size(consumed)
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
    """How --train-iters was resolved, the batch schedule and the LR schedule in samples, for the start-up
    banner and --dry-run ('' for an iteration-based run with a fixed batch)."""
    t = cfg.training
    ramp = batch_schedule(cfg)
    parts = []
    if isinstance(ramp, Rampup):
        parts.append(f"batch ramp-up {ramp.start} -> {ramp.final} by {ramp.increment} over {ramp.samples} samples")
    elif ramp is not None:
        parts.append("batch steps " + ", ".join(f"{batch} from sample {threshold}" for threshold, batch in ramp.steps))
    if t.train_samples is not None:
        sched = lr_schedule(cfg)
        parts.insert(0, f"from --train-samples {t.train_samples}")
        parts.append(f"LR warmup {sched.warmup:.12g}, decay {sched.decay}"
                     + (f", WSD decay {sched.wsd_decay}" if sched.wsd_decay is not None else "") + " samples")
    return f" ({'; '.join(parts)})" if parts else ""
