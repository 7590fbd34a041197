"""Context parallelism (CP): which part of a micro-batch each CP rank keeps, and the loss terms
that make a CP step's loss and gradients exactly those of the unsplit micro-batch.

Megatron-Core's attention with CP (Transformer Engine's ring / all-gather attention) expects every
rank of a CP group to hold its own part of the sequence; cutting the batch is the caller's job, as
in Megatron-LM's `get_batch_on_this_cp_rank` (megatron/core/utils.py in 0.16). A batch that is not
cut gives every CP rank the whole sequence: wrong attention and the loss counted CP times.

The cut (load balancing for causal attention): the sequence is divided into 2 x CP equal chunks
and rank r keeps chunks r and 2 x CP - 1 - r, concatenated in that order. A token near the end of
a causal sequence attends to many more keys than one near the start; pairing an early chunk with
a late one gives every rank the same attention work.

Which values are cut (one explicit rule, checked, never guessed):
- `attention_mask` [b|1, 1, s, s]: on its query dimension (2) only; its key dimension stays
  whole, since a rank's queries attend to keys of every rank (as Megatron-LM does).
- every other tensor whose dimension `seq_dim` has the batch's sequence length s (that of
  `tokens`): tokens, labels, loss_mask, position_ids, RPT's old/ref log-probs, ...
- tensors with no sequence dimension pass unchanged: fewer than `seq_dim` + 1 dimensions, or size 1
  there (per-sequence values such as RPT's `advantages` [b, 1]); so do non-tensors and None.
- anything else is ambiguous and raises ValueError: a size at `seq_dim` other than 1 and s (a
  tensor already cut, packed-sequence `cu_seqlens` [b, s + 1], ...), or a second dimension of
  size s after `seq_dim` on a tensor that is not the attention mask.
"""

from __future__ import annotations

from typing import Optional

import torch

ATTENTION_MASK = "attention_mask"
_MASK_QUERY_DIM = 2


def _check_cp(cp_size: int, cp_rank: int) -> None:
    if not isinstance(cp_size, int) or cp_size < 1:
        raise ValueError(f"context-parallel size must be a positive integer (got {cp_size!r})")
    if not isinstance(cp_rank, int) or not 0 <= cp_rank < cp_size:
        raise ValueError(f"context-parallel rank {cp_rank!r} is not in [0, {cp_size})")


def _keep_chunks(value: torch.Tensor, dim: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    chunk = value.shape[dim] // (2 * cp_size)
    return torch.cat([value.narrow(dim, cp_rank * chunk, chunk),
                      value.narrow(dim, (2 * cp_size - 1 - cp_rank) * chunk, chunk)], dim=dim)


def split_for_context_parallel(batch: dict, cp_size: int, cp_rank: int, seq_dim: int = 1) -> dict:
    """This CP rank's part of `batch` (see the module docstring for which values are cut and how).

    Returns a new dict (the input is not modified); `cp_size` 1 returns `batch` itself. ValueError
    when the sequence length is not a multiple of 2 x `cp_size`, when `batch` has no `tokens`
    tensor to take the sequence length from, and for ambiguous tensors."""
    _check_cp(cp_size, cp_rank)
    if cp_size == 1:
        return batch
    tokens = batch.get("tokens")
    if not torch.is_tensor(tokens) or tokens.dim() <= seq_dim:
        raise ValueError(f"context parallel: the batch needs a 'tokens' tensor with a sequence dimension {seq_dim} "
                         f"to take the sequence length from (got {None if tokens is None else tuple(tokens.shape)})")
    length = tokens.shape[seq_dim]
    if length % (2 * cp_size):
        raise ValueError(f"context parallel: sequence length {length} is not divisible by 2 x context-parallel "
                         f"size {cp_size} = {2 * cp_size} (each rank keeps two of 2 x CP equal chunks)")
    out = {}
    for key, value in batch.items():
        if not torch.is_tensor(value):
            out[key] = value
            continue
        shape = tuple(value.shape)
        if key == ATTENTION_MASK:
            if value.dim() != 4 or shape[_MASK_QUERY_DIM] != length or shape[3] != length:
                raise ValueError(f"context parallel: '{key}' has shape {shape}; expected [b|1, 1, {length}, {length}] "
                                 f"(sequence length {length} from 'tokens')")
            out[key] = _keep_chunks(value, _MASK_QUERY_DIM, cp_size, cp_rank)
            continue
        if value.dim() <= seq_dim or shape[seq_dim] == 1:
            out[key] = value          # no sequence dimension: one value per sequence (or per batch)
            continue
        if shape[seq_dim] != length:
            raise ValueError(f"context parallel: '{key}' has shape {shape}: size {shape[seq_dim]} at dimension "
                             f"{seq_dim} is neither the sequence length {length} (from 'tokens') nor 1; cannot tell "
                             "whether or how to cut it (already cut? packed sequences are not supported)")
        if length in shape[seq_dim + 1:]:
            raise ValueError(f"context parallel: '{key}' has shape {shape}: the sequence length {length} appears at "
                             f"dimension {seq_dim} and again later; only '{ATTENTION_MASK}' may be [.., s, s]")
        out[key] = _keep_chunks(value, seq_dim, cp_size, cp_rank)
    return out


def context_parallel_size_and_rank() -> tuple[int, int]:
    """This rank's (CP size, CP rank) from Megatron-Core's parallel_state; (1, 0) before it exists
    (Megatron-Core would answer size 0 there)."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 1, 0
    return parallel_state.get_context_parallel_world_size(), parallel_state.get_context_parallel_rank()


def split_for_this_cp_rank(batch: dict, seq_dim: int = 1) -> dict:
    """`split_for_context_parallel` with this rank's CP size and rank (parallel_state)."""
    cp_size, cp_rank = context_parallel_size_and_rank()
    return split_for_context_parallel(batch, cp_size, cp_rank, seq_dim)


def loss_terms_for_schedule(loss_sum: torch.Tensor, num_tokens: torch.Tensor, *, per_token_loss: bool,
                            cp_size: int, cp_group: Optional[object] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, num_tokens) to hand Megatron-Core's schedule for this CP rank's masked loss sum S_r and
    token count N_r, such that the step's gradient is that of the unsplit micro-batch.

    What Megatron-Core does with them (0.16.1 and 0.19.2 alike; see training/step.py for the sites):
    - `per_token_loss` (--calculate-per-token-loss): the loss is used as it is, the returned counts
      are summed over micro-batches and all-reduced over data x context parallel, and the summed
      gradients are divided by that total. The local (S_r, N_r) are exact: returned unchanged.
    - otherwise: each micro-batch's loss is divided by the returned count and by the number of
      micro-batches, and DDP averages gradients over data x context parallel (1 / (DP x CP)). The
      unsplit micro-batch contributes S / N with S = sum_r S_r and N = sum_r N_r; returning
      (CP x S_r, N) gives sum_r CP x S_r / N / (DP x CP) = S / N / DP: exact for any loss mask.
      Megatron-LM's own loss_func returns (S_r, N_r), exact only when every CP rank has N / CP
      loss tokens. N costs one all-reduce of one integer over the CP group (`cp_group`, default
      parallel_state's), on every CP rank of the last pipeline stage.
    """
    if per_token_loss or cp_size == 1:
        return loss_sum, num_tokens
    if cp_group is None:
        from megatron.core import parallel_state
        cp_group = parallel_state.get_context_parallel_group()
    total = num_tokens.detach().clone()
    torch.distributed.all_reduce(total, group=cp_group)
    return loss_sum * cp_size, total
