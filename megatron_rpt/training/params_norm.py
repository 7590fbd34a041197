"""--log-params-norm: the L2 norm of the model's parameters as Megatron-LM's `calc_params_l2_norm`
computes it (megatron/training/utils, without its FSDP and GTP-remat branches, which megatron-rpt does
not run).

Each parameter is counted once over the whole job: a parameter that is not split over tensor
parallelism counts on tensor-parallel rank 0 only (expert parameters: on expert-tensor-parallel rank 0),
and a parameter shared between pipeline stages (the output layer tied to the embedding) counts where it
is not marked `shared`. With --bf16 the fp32 main copy is measured (`param.main_param`, which the
distributed optimizer shards over data parallel: those shards are summed over DP x CP, expert ones over
expert DP); otherwise the parameter itself (fp16 too, as Megatron-LM). Squares are summed in fp32 per
tensor, then over the model-parallel group (TP x PP) for dense parameters and the expert
model-parallel group (ETP x EP x PP) for expert ones (once when they are the same group).
Collective over the world: every rank calls it on the same iterations.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps
from megatron.core.transformer.module import param_is_not_shared


def _not_tp_duplicate(param, expert: bool) -> bool:
    """Megatron-Core 0.19's `param_is_not_tensor_parallel_duplicate` with its expert-TP group (0.16's
    has no expert branch)."""
    if getattr(param, "tensor_model_parallel", False):
        return True
    rank = ps.get_expert_tensor_parallel_rank() if expert else ps.get_tensor_model_parallel_rank()
    return rank == 0


def _data(param, bf16: bool):
    """(tensor to measure, whether it is a data-parallel shard): Megatron-LM's _get_param_data. The
    tensor is None where the distributed optimizer keeps none of the parameter's main copy here."""
    if bf16 and hasattr(param, "main_param"):
        return param.main_param, bool(getattr(param, "main_param_sharded", False))
    return param.data, False


def _sum_of_squares(tensors: list, device) -> torch.Tensor:
    total = torch.zeros(1, dtype=torch.float32, device=device)
    for t in tensors:
        total += torch.linalg.vector_norm(t, dtype=torch.float32) ** 2
    return total


def params_l2_norm(model_chunks: list, *, bf16: bool, device) -> float:
    """The parameters' global L2 norm (see the module docstring); collective over the world."""
    buckets: dict = {(expert, sharded): [] for expert in (False, True) for sharded in (False, True)}
    for chunk in model_chunks:
        for param in chunk.parameters():
            expert = not getattr(param, "allreduce", True)
            if not _not_tp_duplicate(param, expert) or not (expert or param_is_not_shared(param)):
                continue
            data, sharded = _data(param, bf16)
            if data is not None:
                buckets[expert, sharded].append(data)
    sq = {key: _sum_of_squares(tensors, device) for key, tensors in buckets.items()}
    all_reduce = torch.distributed.all_reduce
    all_reduce(sq[False, True], group=ps.get_data_parallel_group(with_context_parallel=True))
    all_reduce(sq[True, True], group=ps.get_expert_data_parallel_group())
    dense, experts = sq[False, False] + sq[False, True], sq[True, False] + sq[True, True]
    dense_group, expert_group = ps.get_model_parallel_group(), ps.get_expert_tensor_model_pipeline_parallel_group()
    if torch.distributed.get_process_group_ranks(dense_group) == torch.distributed.get_process_group_ranks(expert_group):
        dense += experts
        all_reduce(dense, group=dense_group)
    else:
        all_reduce(dense, group=dense_group)
        all_reduce(experts, group=expert_group)
        dense += experts
    return dense.item() ** 0.5
