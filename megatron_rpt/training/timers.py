"""Megatron-Core's own timers (`megatron.core.timers.Timers`) for --timing-log-level, as Megatron-LM
uses them.

One `Timers` object per job, made in `training.setup` and set on the TransformerConfig
(`config.timers`) and on the optimizer's config: that is where Megatron-Core's schedules
(forward-backward, forward/backward-compute, pipeline sends/receives), `finalize_model_grads`
(all-grads-sync, embedding-grads-all-reduce, ...) and optimizers (params-all-gather, optimizer-*)
look for it; megatron-rpt adds 'optimizer' around the optimizer step and 'batch-generator' around
reading a micro-batch (`training.step`), and 'save-checkpoint' around a save (`training.driver`).
Evaluation runs with `config.timers` unset, as in Megatron-LM.

`TimerReport.report` is collective over the world: the timers of Megatron-LM's list for the level are
all-gathered (max / (min, max) / per rank, --timing-log-option), written to the sinks as
'<name>-time' (max over ranks, seconds per iteration) with --log-timers-to-tensorboard and returned
as Megatron-Core's text block (milliseconds per iteration) for the logging rank to print after the
interval line. Every rank calls it at the same iterations (the log interval is configuration); with
CPU/gloo, Megatron-Core's `torch.cuda.synchronize()` is the CPU layer's no-op and the all-gather
runs on gloo. Megatron-LM divides by --log-interval; here by the iterations the interval really had
(the last interval of a run can be shorter).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Optional

import torch
from megatron.core.timers import Timers

from megatron_rpt.config.schema import LoggingConfig

# Megatron-LM's training_log lists, by level (megatron/training/training.py); timers that never ran
# are left out of the report by Megatron-Core.
LEVEL_1 = ("forward-backward", "layernorm-grads-all-reduce", "embedding-grads-all-reduce", "all-grads-sync",
           "params-all-gather", "optimizer-copy-to-main-grad", "optimizer-unscale-and-check-inf",
           "optimizer-clip-main-grad", "optimizer-count-zeros", "optimizer-inner-step",
           "optimizer-copy-main-to-model-params", "optimizer")
LEVEL_2 = ("batch-generator", "forward-compute", "backward-compute", "forward-recv", "forward-send",
           "backward-recv", "backward-send", "forward-send-forward-recv", "forward-send-backward-recv",
           "backward-send-forward-recv", "backward-send-backward-recv",
           "forward-backward-send-forward-backward-recv")


def make_timers(logging: LoggingConfig) -> Timers:
    return Timers(logging.timing_log_level, logging.timing_log_option)


def timer_names(level: int) -> list[str]:
    """The timers reported at --timing-log-level `level` (none at 0)."""
    return list(LEVEL_1 if level >= 1 else ()) + list(LEVEL_2 if level >= 2 else ())


@contextmanager
def timed(timers: Optional[Timers], name: str, log_level: int, barrier: bool = False):
    """`timers(name, log_level)` around the block (nothing without timers); not stopped when the block
    raises (an error ends the run)."""
    if timers is None:
        yield
        return
    timers(name, log_level=log_level).start(barrier=barrier)
    yield
    timers(name).stop()


@contextmanager
def log_save_time(timers: Optional[Timers]):
    """Megatron-LM's 'save-checkpoint' timer (level 0: always) around a save, then its (min, max)
    block on rank 0. Collective (all ranks save); skipped when the save raised."""
    with timed(timers, "save-checkpoint", 0):
        yield
    if timers is not None:
        text = timers.get_all_timers_string(["save-checkpoint"], reset=True)
        if text and torch.distributed.get_rank() == 0:
            print(text, flush=True)


class TimerReport:
    """The interval's timers: written to the sinks and returned as text (see the module docstring)."""

    def __init__(self, timers: Optional[Timers], logging: LoggingConfig):
        self.timers = timers
        self.names = timer_names(logging.timing_log_level) if timers is not None else []
        self.to_sinks = logging.log_timers_to_tensorboard

    def report(self, iteration: int, iterations: int, sinks) -> Optional[str]:
        """Collective. `iterations`: how many the interval had (the normaliser)."""
        if not self.names:
            return None
        if self.to_sinks:
            # What Timers.write computes (max over ranks, seconds), sent to our sinks instead of a
            # SummaryWriter or the wandb module; reset=False as in Megatron-LM, the text resets.
            times = self.timers._get_global_min_max_time(self.names, False, False, iterations)
            if sinks is not None:
                for name, (_, longest) in times.items():
                    sinks.add_scalar(f"{name}-time", longest, iteration)
        return self.timers.get_all_timers_string(self.names, normalizer=iterations, reset=True)


def parse_timer_block(text: str) -> dict:
    """Megatron-Core's timer block back to numbers (ms): name -> (min, max) for 'minmax', name -> max for
    'max', name -> {rank: ms} for 'all'. The block ends at its first unindented line after the
    header, so `text` may go on with other output. Tests read the report through this."""
    out: dict = {}
    current = None
    for line in text.splitlines()[1:]:
        if not line.startswith(" "):
            break
        m = re.fullmatch(r"\s+(\S+) \.*: \(([0-9.]+), ([0-9.]+)\)", line)
        if m:
            out[m.group(1)] = (float(m.group(2)), float(m.group(3)))
            continue
        m = re.fullmatch(r"\s+(\S+) \.*: ([0-9.]+)", line)
        if m:
            out[m.group(1)] = float(m.group(2))
            continue
        m = re.fullmatch(r"\s+rank\s+(\d+): ([0-9.]+)", line)
        if m and current is not None:
            out[current][int(m.group(1))] = float(m.group(2))
            continue
        m = re.fullmatch(r"  (\S+):", line)
        if m:
            current = m.group(1)
            out[current] = {}
    return out
