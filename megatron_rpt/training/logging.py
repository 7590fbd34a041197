"""Training metrics: one Megatron-style line per log interval on stdout, scalars to the job's sinks
(TensorBoard and/or W&B, `training.sinks`), and with --timing-log-level Megatron-Core's timer block
after the line (`training.timers`).

Throughput is measured over the whole interval (wall time / iterations); TFLOP/s per device uses
`models.flops.training_flops_per_token`, and MFU divides by the device's dense peak (unknown on
CPU unless --peak-tflops is given, then MFU is not printed). Megatron-LM's optional fields keep its
labels and tags: 'num zeros' / 'num-zeros' (--log-num-zeros-in-grad, the iteration's count),
'params norm' / 'params-norm' (--log-params-norm), 'iteration-time' and '<timer>-time'
(--log-timers-to-tensorboard), 'lm loss validation ppl' (--log-validation-ppl-to-tensorboard).
"""

from __future__ import annotations

import math
import re
import time
from typing import Optional

import torch

from megatron_rpt.training.moe_metrics import format_moe


def peak_memory_gib(device_type: str) -> Optional[float]:
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    except Exception:  # noqa: BLE001
        return None


# Short labels of the loss's distribution statistics (megatron_rpt.loss.STAT_NAMES) in the log line.
_STAT_LABELS = {"cross_entropy": "ce", "entropy": "entropy", "target_prob": "p(target)", "top1": "top1 acc",
                "topk_mass": "topk mass", "tail_mass": "tail mass"}


def _format_stats(stats: dict) -> str:
    return " | ".join(f"{_STAT_LABELS.get(k, k)}: {v:.4f}" for k, v in stats.items())


# Fields of the interval line (`MetricsLogger.record`) that `parse_log_line` reads back, by label.
_LINE_FIELDS = {"consumed samples": "consumed_samples", "elapsed time per iteration (ms)": "ms_per_iter",
                "learning rate": "lr", "global batch size": "global_batch_size", "lm loss": "loss",
                "grad norm": "grad_norm", "num zeros": "num_zeros", "params norm": "params_norm",
                "tokens/s": "tokens_per_s", "TFLOP/s/device": "tflops_per_device",
                "MFU": "mfu", "peak mem (GiB)": "peak_mem_gib", "number of skipped iterations": "skipped",
                "number of nan iterations": "nan_iterations"}


def parse_log_line(line: str) -> Optional[dict]:
    """The numbers of one interval line printed by `MetricsLogger.record` (None for any other line):
    iteration, train_iters and the `_LINE_FIELDS` present (MFU as a fraction). Benchmarks and tests
    read runs through this, so the format has one reader next to its one writer."""
    head, sep, rest = line.partition(" | ")
    m = re.fullmatch(r"\s*iteration\s+(\d+)/\s*(\d+)\s*", head)
    if not sep or m is None:
        return None
    out: dict = {"iteration": int(m.group(1)), "train_iters": int(m.group(2))}
    for part in rest.split(" | "):
        label, colon, value = part.rpartition(": ")
        key = _LINE_FIELDS.get(label.strip())
        if key is None or not colon:
            continue
        value = value.strip().rstrip("|").strip()
        number = float(value.rstrip("%")) / (100 if value.endswith("%") else 1)
        out[key] = int(number) if key in ("consumed_samples", "global_batch_size", "skipped", "nan_iterations") \
            else number
    return out


class MetricsLogger:
    """Accumulates per-iteration results and prints/writes them every `log_interval` iterations."""

    def __init__(self, *, log_interval: int, writer, tensorboard: bool, tensorboard_log_interval: int,
                 train_iters: int, global_batch_size: int, seq_length: int, flops_per_token: float,
                 world_size: int, peak_tflops: Optional[float], device_type: str, is_logging_rank: bool,
                 log_throughput: bool = True, log_memory: bool = True, timers=None,
                 log_validation_ppl: bool = False):
        self.log_interval = log_interval
        self.tb_interval = tensorboard_log_interval
        self.train_iters = train_iters
        self.tokens_per_iter = global_batch_size * seq_length
        self.global_batch_size = global_batch_size
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.peak_tflops = peak_tflops
        self.device_type = device_type
        self.is_logging_rank = is_logging_rank
        self.log_throughput, self.log_memory = log_throughput, log_memory
        # The job's scalar sinks (the training driver's; None off rank 0). `tensorboard`: whether the
        # run writes scalars at all (TensorBoard or W&B), the same on every rank (see wants_stats).
        self.writer = writer
        self.tensorboard = tensorboard
        self.timers = timers            # training.timers.TimerReport (collective at interval ends) or None
        self.log_validation_ppl = log_validation_ppl
        self._reset(time.perf_counter())
        self.last_line: Optional[str] = None

    def _reset(self, now: float) -> None:
        self.t0 = now
        self.n = 0
        self.samples = 0       # sequences trained in the interval (the global batch can ramp up)
        self.loss_sum = 0.0
        self.skipped = 0
        self.nan_iters = 0

    def throughput(self, seconds_per_iter: float, tokens_per_iter: Optional[float] = None) -> dict:
        """Tokens/s, TFLOP/s per device and MFU of iterations of `tokens_per_iter` tokens (default: the
        configured global batch)."""
        tokens_per_s = (self.tokens_per_iter if tokens_per_iter is None else tokens_per_iter) / seconds_per_iter
        tflops_per_device = tokens_per_s * self.flops_per_token / self.world_size / 1e12
        out = {"tokens_per_s": tokens_per_s, "tflops_per_device": tflops_per_device}
        if self.peak_tflops:
            out["mfu"] = tflops_per_device / self.peak_tflops
        return out

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(name, value, step)

    def wants_stats(self, iteration: int) -> bool:
        """Whether `iteration` is printed or written to TensorBoard (its loss statistics are).

        Must be the same on every rank (statistics change the loss's collectives), so it depends on
        the configuration only, never on which rank holds the TensorBoard writer."""
        return (iteration % self.log_interval == 0 or iteration == self.train_iters
                or (self.tensorboard and iteration % self.tb_interval == 0))

    def record(self, iteration: int, result, consumed_samples: int,
               global_batch_size: Optional[int] = None) -> Optional[str]:
        """Account one iteration of `global_batch_size` sequences (default the configured one; it differs under
        --rampup-batch-size); returns the printed line at interval ends (rank-local)."""
        batch = self.global_batch_size if global_batch_size is None else global_batch_size
        self.samples += batch
        if not result.update_successful:
            self.skipped += 1
        elif math.isfinite(result.loss):
            self.loss_sum += result.loss
        else:
            self.nan_iters += 1
        self.n += 1
        if self.writer is not None and iteration % self.tb_interval == 0:
            self.scalar("lm loss", result.loss, iteration)
            self.scalar("learning-rate", result.lr, iteration)
            if result.grad_norm is not None:
                self.scalar("grad-norm", result.grad_norm, iteration)
            if result.num_zeros is not None:
                self.scalar("num-zeros", result.num_zeros, iteration)
            if result.params_norm is not None:
                self.scalar("params-norm", result.params_norm, iteration)
            self.scalar("consumed-samples", consumed_samples, iteration)
            self.scalar("batch-size", batch, iteration)
            for name, value in (result.stats or {}).items():
                self.scalar(f"distribution/{name}", value, iteration)
            for name, value in (result.moe or {}).items():
                if name == "tokens_per_expert":
                    for layer, counts in value.items():
                        self.writer.add_histogram(f"moe/tokens-per-expert/layer{layer:02d}", counts, iteration)
                else:
                    self.scalar(f"moe/{name}", value, iteration)
        if iteration % self.log_interval and iteration != self.train_iters:
            return None
        now = time.perf_counter()
        elapsed = (now - self.t0) / max(self.n, 1)
        counted = self.n - self.skipped - self.nan_iters
        avg_loss = self.loss_sum / counted if counted else float("nan")
        parts = [f" iteration {iteration:8d}/{self.train_iters:8d}",
                 f"consumed samples: {consumed_samples:12d}",
                 f"elapsed time per iteration (ms): {elapsed * 1000:.1f}",
                 f"learning rate: {result.lr:.6E}", f"global batch size: {batch:5d}",
                 f"lm loss: {avg_loss:.6E}"]
        if result.grad_norm is not None:
            parts.append(f"grad norm: {result.grad_norm:.3f}")
        if result.num_zeros is not None:
            parts.append(f"num zeros: {result.num_zeros:.1f}")
        if result.params_norm is not None:
            parts.append(f"params norm: {result.params_norm:.3f}")
        if result.stats:
            parts.append(_format_stats(result.stats))
        if result.moe and format_moe(result.moe):
            parts.append(format_moe(result.moe))
        if self.log_throughput:
            tp = self.throughput(elapsed, self.samples * self.tokens_per_iter / self.global_batch_size / max(self.n, 1))
            parts.append(f"tokens/s: {tp['tokens_per_s']:.0f}")
            parts.append(f"TFLOP/s/device: {tp['tflops_per_device']:.3f}")
            if "mfu" in tp:
                parts.append(f"MFU: {100 * tp['mfu']:.1f}%")
            if self.writer is not None:
                self.scalar("throughput/tokens-per-sec", tp["tokens_per_s"], iteration)
                self.scalar("throughput/tflops-per-device", tp["tflops_per_device"], iteration)
                if "mfu" in tp:
                    self.scalar("throughput/mfu", tp["mfu"], iteration)
        if self.log_memory:
            mem = peak_memory_gib(self.device_type)
            if mem is not None:
                parts.append(f"peak mem (GiB): {mem:.2f}")
                self.scalar("memory/peak-gib", mem, iteration)
        parts.append(f"number of skipped iterations: {self.skipped:3d}")
        parts.append(f"number of nan iterations: {self.nan_iters:3d}")
        line = " | ".join(parts) + " |"
        self.last_line = line
        if self.is_logging_rank:
            print(line, flush=True)
        if self.timers is not None:
            if self.timers.to_sinks:
                self.scalar("iteration-time", elapsed, iteration)
            block = self.timers.report(iteration, self.n, self.writer)
            if block and self.is_logging_rank:
                print(block, flush=True)
        self._reset(now)
        return line

    def log_eval(self, iteration: int, loss: float, tokens: int, stats: Optional[dict] = None) -> None:
        ppl = math.exp(min(loss, 20.0))
        line = (f" validation loss at iteration {iteration} | lm loss value: {loss:.6E} | "
                f"lm loss PPL: {ppl:.6E} | tokens: {tokens} |")
        if stats:
            line += f" {_format_stats(stats)} |"
            for name, value in stats.items():
                self.scalar(f"distribution-validation/{name}", value, iteration)
        if self.is_logging_rank:
            print("-" * len(line), flush=True)
            print(line, flush=True)
            print("-" * len(line), flush=True)
        self.scalar("lm loss validation", loss, iteration)
        if self.log_validation_ppl:   # Megatron-LM writes it only with --log-validation-ppl-to-tensorboard
            self.scalar("lm loss validation ppl", ppl, iteration)
