"""Where a job's scalars go besides stdout: TensorBoard (--tensorboard-dir) and Weights & Biases
(--wandb-project), behind one object so that the two cannot drift apart.

`MetricSinks` has the part of TensorBoard's `SummaryWriter` interface the loops use (`add_scalar`,
`add_histogram`, `flush`, `close`) and hands every call to each open sink: a W&B run receives exactly
the TensorBoard tags and values, with the iteration as its step (a step's values are sent as one
`wandb.log` call when the step changes, or at flush/close). It exists on global rank 0 only, where
the interval line is printed; every value it receives is already reduced over the ranks it
concerns. Megatron-LM keeps its TensorBoard writer and W&B run on the last rank (where its loss
lives; here the loss is shared with every rank) and sends training scalars to W&B only when a
TensorBoard writer exists; here W&B works with or without --tensorboard-dir.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from megatron_rpt.config.schema import RunConfig


def writes_scalars(cfg: RunConfig) -> bool:
    """Whether the run has any scalar sink (the same answer on every rank, see MetricsLogger.wants_stats)."""
    return bool(cfg.logging.tensorboard_dir or cfg.logging.wandb_project)


def wandb_dir(cfg: RunConfig) -> str:
    """--wandb-save-dir, default SAVE/wandb (Megatron-LM's)."""
    return cfg.logging.wandb_save_dir or os.path.join(cfg.checkpoint.save, "wandb")


class MetricSinks:
    """TensorBoard and/or a W&B run, fed by the same calls (see the module docstring)."""

    def __init__(self, tensorboard=None, wandb_run=None):
        self.tensorboard, self.wandb_run = tensorboard, wandb_run
        self._step: Optional[int] = None
        self._pending: dict = {}

    def _to_wandb(self, tag: str, value, step: int) -> None:
        if self.wandb_run is None:
            return
        if self._step is not None and step != self._step:
            self._send()
        self._step = step
        self._pending[tag] = value

    def _send(self) -> None:
        if self._pending:
            self.wandb_run.log(self._pending, step=self._step)
        self._pending = {}

    def add_scalar(self, tag: str, value, step: int) -> None:
        value = float(value)
        if self.tensorboard is not None:
            self.tensorboard.add_scalar(tag, value, step)
        self._to_wandb(tag, value, step)

    def add_histogram(self, tag: str, values, step: int) -> None:
        if self.tensorboard is not None:
            self.tensorboard.add_histogram(tag, values, step)
        if self.wandb_run is not None:
            import wandb
            self._to_wandb(tag, wandb.Histogram(values), step)

    def flush(self) -> None:
        if self.wandb_run is not None:
            self._send()
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def close(self) -> None:
        self.flush()
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def open_sinks(cfg: RunConfig) -> Optional[MetricSinks]:
    """The job's sinks on global rank 0 (None elsewhere, or without --tensorboard-dir/--wandb-project).
    W&B gets the run configuration as its config (Megatron-LM gives its arguments)."""
    lg = cfg.logging
    if not writes_scalars(cfg) or torch.distributed.get_rank() != 0:
        return None
    tensorboard = wandb_run = None
    if lg.tensorboard_dir:
        from torch.utils.tensorboard import SummaryWriter
        tensorboard = SummaryWriter(log_dir=lg.tensorboard_dir, max_queue=100)
    if lg.wandb_project:
        import wandb
        folder = wandb_dir(cfg)
        os.makedirs(folder, exist_ok=True)
        wandb_run = wandb.init(project=lg.wandb_project, name=lg.wandb_exp_name, entity=lg.wandb_entity,
                               dir=folder, config=cfg.to_dict())
    return MetricSinks(tensorboard, wandb_run)
