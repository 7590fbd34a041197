"""The training driver shared by pretraining (`training.loop`) and RPT (`rpt.loop`).

`TrainingDriver` owns what every training job does around its step: resuming from --load (iteration
and consumed-sample counters), the iteration loop up to --train-iters, evaluation and checkpoint
cadence (--eval-interval, --save-interval, a final save; with --async-save the publication of a
finished background save is checked at the top of every iteration and awaited before the next save
and before `run` returns), stopping between iterations on a preemption signal,
--exit-duration-in-mins or --exit-interval (`ExitWatch`), the save-checkpoint timer, the job's one
scalar sink (`training.sinks`: TensorBoard and/or W&B on rank 0; `scalars`), and the run-time controls
around each iteration: manual garbage collection (`ManualGC`) and the profiler (`training.profiling`).
The job supplies its step (one iteration's work and its stdout line) and its evaluation as callables;
the driver never looks at what a step computes.
"""

from __future__ import annotations

import contextlib
import gc
import signal
import time
from typing import Callable, Optional

import torch

from megatron_rpt import distributed as dist
from megatron_rpt.checkpoint.layout import checkpoint_path
from megatron_rpt.checkpoint.sharded import finalize_async_saves, pending_async_saves
from megatron_rpt.config.schema import RunConfig
from megatron_rpt.training.sinks import open_sinks
from megatron_rpt.training.timers import log_save_time


class SignalFlag:
    """Remembers SIGTERM/SIGUSR1 (SLURM preemption) so the loop saves and exits between iterations.
    Installed first thing in a job, so that a signal during set-up (model build, dataset indices:
    minutes at scale) is remembered instead of killing the job."""

    def __init__(self, enabled: bool):
        self.received: Optional[int] = None
        if enabled:
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, self._handler)

    def _handler(self, signum, frame):  # noqa: ARG002
        self.received = signum


def any_rank(flags: list, device: torch.device) -> list:
    """Element-wise OR of per-rank flags (one MAX all-reduce), so every rank decides alike."""
    return [bool(v) for v in dist.max_over_ranks([bool(f) for f in flags], device)]


class ExitWatch:
    """When a training loop must stop between iterations: a signal (--exit-signal-handler), the run
    time (--exit-duration-in-mins, from `start_time`) or --exit-interval. Signal and time are agreed
    by one MAX all-reduce, and only when they can end the run, so every rank stops at the same
    iteration."""

    def __init__(self, training, start_time: float, signals: SignalFlag, device: torch.device):
        self.t, self.start_time, self.signals, self.device = training, start_time, signals, device
        self.collective = training.exit_signal_handler or bool(training.exit_duration_in_mins)

    def reason(self, iteration: int) -> Optional[str]:
        """'signal', 'exit_duration', 'exit_interval' or None (collective when signals or time are watched)."""
        t = self.t
        if self.collective:
            out_of_time = bool(t.exit_duration_in_mins) and time.time() - self.start_time > 60 * t.exit_duration_in_mins
            signalled, timed_out = any_rank([self.signals.received is not None, out_of_time], self.device)
            if signalled:
                return "signal"
            if timed_out:
                return "exit_duration"
        if t.exit_interval and iteration % t.exit_interval == 0:
            return "exit_interval"
        return None


class ManualGC:
    """--manual-gc (Megatron-LM's training.train): Python's automatic collector is off for the loop, with
    one full collection at the start, one after every --manual-gc-interval-th iteration, a full one
    before each evaluation and a young-generation one after it (unless --no-manual-gc-eval). The
    points are iteration numbers, the same on every rank, so no rank pauses for a collection while the
    others wait in a collective. Unlike Megatron-LM (whose process ends with the run), `close()` gives
    the collector back as it was: pretrain() and rpt_train() are library calls."""

    def __init__(self, training):
        self.on, self.interval, self.eval = training.manual_gc, training.manual_gc_interval, training.manual_gc_eval
        self.was_enabled = gc.isenabled()
        if self.on:
            gc.disable()
            gc.collect()

    def after_step(self, iteration: int) -> None:
        if self.on and self.interval and iteration % self.interval == 0:
            gc.collect()

    @contextlib.contextmanager
    def around_eval(self):
        if self.on and self.eval:
            gc.collect()
        yield
        if self.on and self.eval:
            gc.collect(generation=0)

    def close(self) -> None:
        if self.on and self.was_enabled:
            gc.enable()


class TrainingDriver:
    """Resume, iterate, evaluate, save and stop for one job (see the module docstring).

    `consumed_train` / `consumed_valid` are the job's sample counters (RPT counts contexts); the step
    advances them, the driver restores them from and writes them into checkpoints."""

    def __init__(self, cfg: RunConfig, state, device: torch.device, *, start_time: float, signals: SignalFlag,
                 name: str):
        self.cfg, self.state, self.device, self.name = cfg, state, device, name
        self.exit_watch = ExitWatch(cfg.training, start_time, signals, device)
        self.iteration = self.start_iteration = 0
        self.consumed_train = self.consumed_valid = 0
        self.resumed_from: Optional[str] = None
        self.saved: list = []       # published checkpoints (async ones once every rank's writer is done)
        self._pending: list = []    # iterations of async saves not yet published
        # Megatron-LM's `num_floating_point_operations_so_far` in checkpoints: the resumed total plus
        # flops_per_sample (training FLOPs of one sample; set by the pretraining loop, 0 in RPT) per sample.
        self.flops_per_sample = 0.0
        self._flops_at_resume, self._consumed_at_resume = 0.0, 0
        self.exit_reason = "train_iters"
        # The job's scalar sinks (TensorBoard and/or W&B, training.sinks): rank 0 only, None without either.
        self.writer = open_sinks(cfg)

    def scalars(self, prefix: str, values: dict, iteration: int) -> None:
        """Every int/float of `values` (bools and None left out) as `prefix/name` at `iteration`."""
        if self.writer is None:
            return
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{prefix}/{name}", value, iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None

    def resume(self, counted: str = "samples"):
        """Load --load (at --ckpt-step) into the state and say so on rank 0 (`counted`: what the
        consumed counter counts): the loaded checkpoint, or None without one."""
        from megatron_rpt.training.checkpointing import load_checkpoint

        ckpt = self.cfg.checkpoint
        if not ckpt.load:
            return None
        loaded = load_checkpoint(ckpt.load, self.state, self.cfg, iteration=ckpt.ckpt_step)
        if loaded is None:
            dist.print_rank_0(f"> no checkpoint in {ckpt.load}; starting from the initial weights")
            return None
        self.iteration = self.start_iteration = loaded.iteration
        self.consumed_train, self.consumed_valid = loaded.consumed_train_samples, loaded.consumed_valid_samples
        self._flops_at_resume, self._consumed_at_resume = loaded.num_floating_point_operations_so_far, self.consumed_train
        self.resumed_from = loaded.path
        dist.print_rank_0(f"> resumed from {loaded.path} at iteration {loaded.iteration} (consumed {counted} "
                          f"{self.consumed_train}){' [resharded]' if loaded.resharded else ''}")
        return loaded

    def save(self, iteration: int) -> None:
        """A full checkpoint (model, optimizer, scheduler, RNG, counters) of `iteration` to --save.
        With --async-save the writing goes on in the background (published by `finish_saves` or the
        per-iteration check in `run`); a save still pending is waited for first."""
        from megatron_rpt.training.checkpointing import save_checkpoint

        ckpt = self.cfg.checkpoint
        if not ckpt.save:
            return
        if ckpt.async_save and pending_async_saves():
            dist.print_rank_0(f"> waiting for the async save of iteration {self._pending[0]} before saving "
                              f"iteration {iteration}")
            self.finish_saves()
        t0 = time.perf_counter()
        path = checkpoint_path(ckpt.save, iteration)

        def published() -> None:
            self.saved.append(path)
            if ckpt.async_save:
                self._pending.remove(iteration)
                dist.print_rank_0(f"> saved checkpoint {path} (async, published {time.perf_counter() - t0:.1f} s "
                                  f"after it was scheduled)")

        if ckpt.async_save:
            self._pending.append(iteration)
        # The timer's block follows the save's line (with --async-save it times the part in the loop).
        with log_save_time(self.state.config.timers):
            save_checkpoint(ckpt.save, iteration, self.state, self.cfg, consumed_train_samples=self.consumed_train,
                            consumed_valid_samples=self.consumed_valid, fully_parallel=ckpt.ckpt_fully_parallel_save,
                            async_save=ckpt.async_save, on_published=published,
                            num_floating_point_operations_so_far=self._flops_at_resume + self.flops_per_sample * (
                                self.consumed_train - self._consumed_at_resume))
            if ckpt.async_save:
                dist.print_rank_0(f"> scheduled async save of {path} ({time.perf_counter() - t0:.1f} s in the loop)")
            else:
                dist.print_rank_0(f"> saved checkpoint {path} ({time.perf_counter() - t0:.1f} s)")

    def finish_saves(self) -> None:
        """Wait for every pending async save and publish it (collective; every exit path calls it)."""
        finalize_async_saves(blocking=True)

    def run(self, step: Callable[[int], None], *, evaluate: Optional[Callable[[int], None]] = None,
            eval_at_start: bool = False, eval_at_end: bool = False) -> int:
        """Iterate `step(iteration)` (the number of the iteration it performs, from the start iteration
        + 1) up to --train-iters or an exit; returns the last iteration done. `evaluate(iteration)` runs
        every --eval-interval; `eval_at_start` also before the first iteration of a fresh run,
        `eval_at_end` once after the last (then not twice at an interval that falls on it)."""
        from megatron_rpt.platform import get_platform
        from megatron_rpt.training.profiling import StepProfiler

        t = self.cfg.training
        every = t.eval_interval if evaluate is not None else 0
        iteration = self.iteration
        last_saved = iteration if self.resumed_from else None
        platform = get_platform()
        if t.empty_unused_memory_level and not platform.caching_allocator:
            dist.print_rank_0(f"> --empty-unused-memory-level {t.empty_unused_memory_level}: no effect on "
                              f"{platform.device_type} (no caching allocator to empty)")
        collector = ManualGC(t)
        profiler = StepProfiler(self.cfg.profiling, self.cfg.logging.tensorboard_dir, platform, iteration)

        def run_eval(at: int) -> None:
            with collector.around_eval():
                evaluate(at)

        try:
            if every and eval_at_start and iteration == 0:
                run_eval(0)
            while iteration < t.train_iters:
                finalize_async_saves(blocking=False)   # publish a finished async save (as Megatron-LM, each iteration)
                profiler.begin(iteration + 1)
                step(iteration + 1)
                iteration = self.iteration = iteration + 1
                profiler.end(iteration)
                collector.after_step(iteration)
                if every and iteration % every == 0 and not (eval_at_end and iteration == t.train_iters):
                    run_eval(iteration)
                if self.cfg.checkpoint.save_interval and iteration % self.cfg.checkpoint.save_interval == 0:
                    self.save(iteration)
                    last_saved = iteration
                reason = self.exit_watch.reason(iteration)
                if reason is not None:
                    self.exit_reason = reason
                    break
            profiler.close()
            if self.cfg.checkpoint.save and last_saved != iteration:
                self.save(iteration)
            self.finish_saves()   # the process must not end before the last checkpoint is published
            if every and eval_at_end and self.exit_reason == "train_iters":
                run_eval(iteration)
        finally:
            profiler.close()
            collector.close()
        dist.print_rank_0(f"> {self.name} stopped at iteration {iteration} ({self.exit_reason})")
        return iteration
