"""One training / evaluation step on Megatron-Core's forward-backward schedules.

Labels go into the model, as in Megatron-LM, and the pluggable `megatron_rpt.loss` function runs
as the model's per-token head (`models.gpt.token_head`) on the output layer's vocab-parallel logits
[s, b, V/TP] as they are (no transposed copy, no fp32 upcast); the per-token loss is masked and
summed here, and Megatron's schedule divides by tokens and micro-batches (or not, with
--calculate-per-token-loss). On steps
that are logged, the loss also returns distribution statistics (cross-entropy, entropy, ...),
which are token-averaged over the global batch like the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Iterator, Optional

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_model_config

from megatron_rpt.loss import STAT_NAMES, LossFn
from megatron_rpt.models.gpt import token_head
from megatron_rpt.training.context_parallel import (context_parallel_size_and_rank, loss_terms_for_schedule,
                                                    split_for_context_parallel)
from megatron_rpt.training.timers import timed


@dataclass
class StepResult:
    loss: float                 # token-weighted mean LM loss over the global batch
    num_tokens: int             # loss tokens in the global batch
    grad_norm: Optional[float]
    num_zeros: Optional[float]     # zeros in the gradients (--log-num-zeros-in-grad; Megatron-Core's count)
    update_successful: bool
    lr: float
    nonfinite: bool = False        # NaN/inf gradients: the update was skipped (see grads_are_finite)
    stats: Optional[dict] = None   # token means of the loss's distribution statistics (logged steps)
    moe: Optional[dict] = None     # router statistics (MoE, logged steps; see training/moe_metrics.py)
    params_norm: Optional[float] = None  # L2 norm of the parameters (--log-params-norm, logged steps)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _loss_func(loss_mask: torch.Tensor, stats: Optional[dict], per_token: torch.Tensor, *,
               per_token_loss: bool = False, cp_size: int = 1):
    """per-token loss [b, s] (the model's output) -> (masked loss sum, token count, report) in
    Megatron's 3-tuple form; `stats` holds the loss's per-token statistics [s, b] when collected.

    Under context parallelism the inputs are this CP rank's chunks. The report holds this rank's
    own sum and count (summed over data x context parallel by `reduce_from_last_stage`: exactly the
    unsplit micro-batch's). What goes to the schedule is `loss_terms_for_schedule`'s: unchanged with
    --calculate-per-token-loss (Megatron-Core sums the counts over micro-batches and DP x CP and
    divides the summed gradients by the total: pipeline_parallel/schedules.py forward_step_calc_loss,
    0.16.1 l.256-263 / 0.19.2 l.328-335; distributed/finalize_model_grads.py, 0.16.1 l.484-497 /
    0.19.2 l.680-696); otherwise the micro-batch's loss is divided by the returned count there and DDP
    scales gradients by 1 / (DP x CP) before summing them (distributed/distributed_data_parallel.py,
    0.16.1 l.254-288 / 0.19.2 l.179-213), so (CP x local sum, CP group's count) makes the CP group's
    gradients add up to the unsplit micro-batch's mean (derivation in `loss_terms_for_schedule`)."""
    mask = loss_mask.float()
    loss = torch.sum(per_token.float() * mask)
    num_tokens = mask.sum().detach().to(torch.int)
    report = {"lm loss": torch.stack([loss.detach().clone(), num_tokens.float()])}
    if stats:
        keep = mask.t() > 0
        report["stats"] = torch.stack([torch.where(keep, stats[name].float(), 0.0).sum() for name in STAT_NAMES])
    loss, num_tokens = loss_terms_for_schedule(loss, num_tokens, per_token_loss=per_token_loss, cp_size=cp_size)
    return loss, num_tokens, report


class ForwardStep:
    """Megatron-style forward_step_func(data_iterator, model); set `collect_stats` before a step
    whose distribution statistics should be reported. `loss_fn` None: Megatron-Core's own language
    model loss (GPTModel.compute_language_model_loss, exactly Megatron-LM's path; no statistics),
    the baseline of benchmarks/train_step.py."""

    def __init__(self, loss_fn: Optional[LossFn], device: torch.device):
        self.loss_fn, self.device = loss_fn, device
        self.collect_stats = False

    def __call__(self, data_iterator: Iterator[dict], model):
        # Every CP rank of a data-parallel rank reads the same micro-batch and keeps its two chunks.
        cp_size, cp_rank = context_parallel_size_and_rank()
        config = get_model_config(model)   # the schedule's own: the same flags and timers
        with timed(config.timers, "batch-generator", 2):
            batch = split_for_context_parallel(_to_device(next(data_iterator), self.device), cp_size, cp_rank)
        args = (batch["tokens"], batch["position_ids"], batch.get("attention_mask"))
        accounting = dict(per_token_loss=config.calculate_per_token_loss, cp_size=cp_size)
        if self.loss_fn is None:
            return (model(*args, labels=batch["labels"]),
                    partial(_loss_func, batch["loss_mask"], None, **accounting))
        stats: Optional[dict] = {} if self.collect_stats else None
        with token_head(model, partial(self.loss_fn, stats=stats)):
            output = model(*args, labels=batch["labels"])
        return output, partial(_loss_func, batch["loss_mask"], stats, **accounting)


def make_forward_step(loss_fn: Optional[LossFn], device: torch.device) -> ForwardStep:
    return ForwardStep(loss_fn, device)


def reduce_from_last_stage(tensor: torch.Tensor, op=torch.distributed.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce (in place) what the last pipeline stage computed over its data-parallel (and
    context-parallel) ranks, then give it to every pipeline stage. Other stages' values are replaced
    by zeros, the neutral element of SUM and, for values >= 0, of MAX."""
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        torch.distributed.all_reduce(tensor, op=op, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    else:
        tensor.zero_()
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(tensor, op=op, group=parallel_state.get_pipeline_model_parallel_group())
    return tensor


def _reduce_losses(losses_reduced: list, device: torch.device) -> tuple[float, int, Optional[dict]]:
    """Sum (loss, tokens[, stats]) over micro-batches and data parallel; share with every pipeline stage."""
    n_stats = len(STAT_NAMES)
    total = torch.zeros(2 + n_stats, dtype=torch.float64, device=device)
    have_stats = torch.zeros(1, dtype=torch.float64, device=device)
    for item in losses_reduced:
        total[:2] += item["lm loss"].to(torch.float64)
        if "stats" in item:
            total[2:] += item["stats"].to(torch.float64)
            have_stats.fill_(1.0)
    values = reduce_from_last_stage(torch.cat([total, have_stats])).tolist()
    tokens = int(values[1])
    stats = None
    if values[-1] > 0:
        stats = {name: values[2 + i] / max(tokens, 1) for i, name in enumerate(STAT_NAMES)}
    return values[0] / max(tokens, 1), tokens, stats


def grads_are_finite(model_chunks: list, device: torch.device) -> bool:
    """Whether every gradient of every rank is finite: one float32 sum per DDP grad buffer (NaN and
    inf propagate into it; no tensor-sized temporaries) and one MAX all-reduce over the world, so
    every rank (all PP stages, DP replicas, distributed-optimizer shards) takes the same decision."""
    bad = torch.zeros(1, dtype=torch.float32, device=device)
    for chunk in model_chunks:
        for buffer in getattr(chunk, "buffers", []) + getattr(chunk, "expert_parallel_buffers", []):
            if buffer.grad_data is not None and buffer.grad_data.numel():
                if not torch.isfinite(torch.sum(buffer.grad_data, dtype=torch.float32)):
                    bad.fill_(1.0)
    torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return bad.item() == 0


def optimizer_step(state) -> tuple:
    """`state.optimizer.step()` -> (update_successful, grad_norm, num_zeros_in_grad) under Megatron-LM's
    level-1 'optimizer' timer (num_zeros is None unless --log-num-zeros-in-grad)."""
    with timed(state.config.timers, "optimizer", 1, barrier=state.config.barrier_with_L1_time):
        updated, grad_norm, num_zeros = state.optimizer.step()
    # Megatron-Core's mixed-precision optimizers return 0, not None, when zeros are not counted.
    return updated, grad_norm, num_zeros if state.optimizer.config.log_num_zeros_in_grad else None


def release_unused_memory(level: int, at: int) -> None:
    """--empty-unused-memory-level: empty the device's allocator cache when `level` >= `at` (1: after each
    forward-backward, 2: also after each optimizer step, as Megatron-LM's train_step/evaluate)."""
    if level >= at:
        from megatron_rpt.platform import get_platform
        get_platform().empty_cache()


def train_step(state, data_iterators: list, forward_step, *, num_microbatches: int, seq_length: int,
               micro_batch_size: int, global_batch_size: int, device: torch.device,
               check_finite: bool = True, empty_unused_memory_level: int = 0) -> StepResult:
    """Zero grads, run the schedule, step the optimizer and (on success) the LR scheduler.

    `check_finite` (bf16/fp32): NaN/inf gradients skip the optimizer and scheduler step instead of
    writing NaN into the weights (fp16 leaves this to its loss scaler, which skips overflowing steps
    itself and must see them to lower the scale).

    `data_iterators` holds one iterator per model chunk (virtual pipeline stages each read the same
    micro-batch sequence; see `MicroBatchIterator`).
    """
    for chunk in state.model:
        chunk.zero_grad_buffer()
    state.optimizer.zero_grad()
    iterators = data_iterators[0] if len(data_iterators) == 1 else data_iterators
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators,
        model=state.model,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    release_unused_memory(empty_unused_memory_level, 1)
    nonfinite = check_finite and not grads_are_finite(state.model, device)
    if nonfinite:
        update_successful, grad_norm, num_zeros = False, None, None
    else:
        update_successful, grad_norm, num_zeros = optimizer_step(state)
    if update_successful:
        state.scheduler.step(increment=global_batch_size)
    release_unused_memory(empty_unused_memory_level, 2)
    loss, tokens, stats = _reduce_losses(losses, device)
    lr = state.optimizer.param_groups[0]["lr"]
    return StepResult(loss=loss, num_tokens=tokens, grad_norm=None if grad_norm is None else float(grad_norm),
                      num_zeros=num_zeros, update_successful=bool(update_successful), lr=float(lr),
                      nonfinite=nonfinite, stats=stats)


@torch.no_grad()
def evaluate(state, data_iterators: list, forward_step, *, eval_iters: int, num_microbatches: int,
             seq_length: int, micro_batch_size: int, device: torch.device,
             empty_unused_memory_level: int = 0) -> tuple[float, int, Optional[dict]]:
    """Mean LM loss (and distribution statistics, where the loss has them) over `eval_iters` global
    batches of the validation split (forward only)."""
    for chunk in state.model:
        chunk.eval()
    collect, forward_step.collect_stats = forward_step.collect_stats, True
    # Evaluation is not timed (Megatron-LM unsets config.timers in evaluate(), too).
    timers, state.config.timers = state.config.timers, None
    iterators = data_iterators[0] if len(data_iterators) == 1 else data_iterators
    losses = []
    try:
        for _ in range(eval_iters):
            losses.extend(get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iterators, model=state.model,
                num_microbatches=num_microbatches, seq_length=seq_length,
                micro_batch_size=micro_batch_size, forward_only=True))
            release_unused_memory(empty_unused_memory_level, 1)
    finally:
        forward_step.collect_stats = collect
        state.config.timers = timers
        for chunk in state.model:
            chunk.train()
    return _reduce_losses(losses, device)
