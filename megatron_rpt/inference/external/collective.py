"""The collectives of the external rollout engine: which ranks share one conversation with the
server, and how the answer (or an error) reaches the other ranks.

`rollout_group()` is the group of ranks that share a data-parallel rank: Megatron-Core's
model-parallel group (TP x PP) or, with context parallelism, a TP x CP x PP group created here.
Its first rank alone talks to the server for `generate` and `broadcast`s the rollouts; the weight
sync broadcasts rank 0's outcome over the default group. Without a process group (`initialized_dist()`
is None) the engine is a plain single-process client and nothing here runs.
"""

from __future__ import annotations

import sys


def broadcast(dist, box: list, src: int, group) -> None:
    """broadcast_object_list from global rank `src` over `group` (None: the default group); an NCCL
    group moves the pickled bytes through the current CUDA device, gloo through the CPU."""
    device = None
    if "nccl" in str(dist.get_backend(group)).lower():
        import torch
        device = torch.device("cuda", torch.cuda.current_device())
    dist.broadcast_object_list(box, src=src, group=group, device=device)


def rollout_group():
    """(group, first global rank) of the ranks that share this rank's data-parallel rank, or None: no
    process group, Megatron-Core's parallel_state not initialised, or a group of one rank.

    That is Megatron-Core's model-parallel group (TP x PP: `get_ranks('tp-pp')` in 0.16's
    initialize_model_parallel) unless context parallelism is on: CP ranks share the data-parallel
    rank (the same sequences, split along the sequence) but sit in different model-parallel groups,
    and Megatron-Core has no TP x CP x PP group, so one is created here (collective over all ranks)."""
    dist = initialized_dist()
    if dist is None:
        return None
    ps = sys.modules.get("megatron.core.parallel_state")    # never imported: never initialised (and no
    if ps is None or not ps.model_parallel_is_initialized():  # seconds spent importing megatron.core here)
        return None
    if ps.get_context_parallel_world_size() == 1:
        group = ps.get_model_parallel_group()
        if dist.get_world_size(group) == 1:
            return None
        return group, ps.get_model_parallel_src_rank()
    dp_ranks: list = [None] * dist.get_world_size()
    dist.all_gather_object(dp_ranks, ps.get_data_parallel_rank())
    mine = None
    for dp in sorted(set(dp_ranks)):          # every rank creates every group, in the same order
        ranks = [r for r, d in enumerate(dp_ranks) if d == dp]
        group = dist.new_group(ranks)
        if dist.get_rank() in ranks:
            mine = (group, ranks[0])
    return mine


def initialized_dist():
    """torch.distributed when a default process group exists (imported lazily: a client needs no torch)."""
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    return dist if dist.is_available() and dist.is_initialized() else None
