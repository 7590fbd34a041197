"""Megatron-Core sites that break on CPU / gloo, one patch each: P6, P7, P14, P15, P16.

Unlike the CUDA stand-ins (`cuda_stubs.py`), each of these replaces one Megatron-Core function or
method, applied when its module is imported (`hooks.when_imported`): split sizes passed to gloo as
tensors (P6), the torch norm refusing sequence parallelism (P7), a spawn-started multiprocessing
Manager on every first checkpoint save (P14, speed), expert weights drawn from the wrong RNG stream
with CPU initialisation (P15), and uneven all-gather / reduce-scatter that gloo rejects (P16).
They are applied on CPU only.

Each patch's docstring names its upstream site (file:function in megatron-core) and the versions it
is gated on; `registry.py` is the table. See docs/megatron-core-on-cpu.md.
"""

from __future__ import annotations

import types
from typing import Any

import torch

from megatron_rpt.platform.compat.hooks import new_with_config_flag_off, rebind_everywhere, set_attr, when_imported

def _p6_split_sizes_to_numpy() -> None:
    """P6: `transformer/moe/moe_utils.py:maybe_move_tensor_to_cpu` converts to numpy only for
    CUDA tensors, so the alltoall dispatcher passes a tensor as split sizes to
    `all_to_all_single` ("incompatible function arguments").
    Checked against megatron-core >=0.16,<0.20 (0.16.1, 0.19.2). CPU only.
    """

    def fix(mod: types.ModuleType) -> None:
        original = mod.maybe_move_tensor_to_cpu

        def maybe_move_tensor_to_cpu(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
            if torch.is_tensor(tensor) and not tensor.is_cuda:
                return tensor.numpy() if as_numpy else tensor
            return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

        rebind_everywhere("P6", mod, "maybe_move_tensor_to_cpu", maybe_move_tensor_to_cpu)

    when_imported("P6", "megatron.core.transformer.moe.moe_utils", fix)


def _p7_torch_norm_sequence_parallel() -> None:
    """P7: `transformer/torch_norm.py:WrappedTorchNorm.__new__` asserts sequence parallel is off,
    but MoE with TP>1 requires sequence parallel (without TE). Checked against megatron-core >=0.16,<0.20 (0.16.1, 0.19.2). CPU only.

    Builds the torch norm anyway and tags its parameters `sequence_parallel=True`, so
    `finalize_model_grads` all-reduces their (partial, per-sequence-shard) grads over TP.
    """

    def tag(norm: Any, config: Any) -> Any:
        for p in norm.parameters():
            p.sequence_parallel = True
        return norm

    def fix(mod: types.ModuleType) -> None:
        new_with_config_flag_off("P7", mod.WrappedTorchNorm, "sequence_parallel", tag)

    when_imported("P7", "megatron.core.transformer.torch_norm", fix)



def _p14_fork_results_queue() -> None:
    """P14 (new; speed, not correctness): `dist_checkpointing/strategies/filesystem_async.py:
    _get_write_results_queue` (0.16.x; `get_write_results_queue(mp_mode)` in 0.19.x) starts a
    multiprocessing Manager with the *spawn* context on the first save of every process: a fresh
    interpreter importing torch, 4-13 s per rank on 2 cores (the "first save 4-7 s" warm-up measured
    before P14). Spawn protects CUDA state; a CPU process has none, so the Manager is started with
    fork (~0.05 s). Same queue type.
    Checked against megatron-core >=0.16,<0.20 (0.16.1, 0.19.2). CPU only.
    """
    import multiprocessing as mp

    def fix(mod: types.ModuleType) -> None:
        def get_write_results_queue(mp_mode: str = "fork") -> Any:  # noqa: ARG001 - always fork on CPU
            if mod._results_queue is None:
                mod._results_queue = mp.get_context("fork").Manager().Queue()
            return mod._results_queue

        # 0.16.x: `_get_write_results_queue()`; 0.19.x: `get_write_results_queue(mp_mode="spawn")`.
        names = [n for n in ("get_write_results_queue", "_get_write_results_queue") if hasattr(mod, n)]
        if not names:
            raise RuntimeError(f"P14: {mod.__name__} has no (_)get_write_results_queue; update the patch "
                               "for this megatron-core version")
        for name in names:
            rebind_everywhere("P14", mod, name, get_write_results_queue)

    when_imported("P14", "megatron.core.dist_checkpointing.strategies.filesystem_async", fix)


def _p15_expert_cpu_init() -> None:
    """P15 (new): `tensor_parallel/layers.py` `ColumnParallelLinear.__init__` / `RowParallelLinear.__init__`
    with `use_cpu_initialization` build every weight from the default torch generator, also for
    experts (`is_expert=True`), where the GPU path (`_initialize_affine_weight_gpu`) forks the
    expert-parallel RNG stream. All EP ranks seed that generator alike, so at EP=N each rank's
    local experts are copies of rank 0's (measured: EP=2 experts 4..7 == 0..3).
    Checked against megatron-core >=0.16,<0.20 (0.16.1, 0.19.2). CPU only.

    Expert layers are initialised inside `get_cuda_rng_tracker().fork(expert-parallel name)`
    (P2 makes the tracker drive the CPU generator), as on GPU.
    """

    def fix(mod: types.ModuleType) -> None:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, get_expert_parallel_rng_tracker_name

        for cls_name in ("ColumnParallelLinear", "RowParallelLinear"):
            cls = getattr(mod, cls_name)
            original = cls.__init__

            def __init__(self, *args, __original=original, **kwargs):
                config = kwargs.get("config")
                tracker, name = get_cuda_rng_tracker(), get_expert_parallel_rng_tracker_name()
                # Only once the seeds are set (model_parallel_cuda_manual_seed adds the expert stream).
                if kwargs.get("is_expert") and config is not None and config.use_cpu_initialization \
                        and name in tracker.get_states():
                    with tracker.fork(name):
                        return __original(self, *args, **kwargs)
                return __original(self, *args, **kwargs)

            set_attr("P15", cls, "__init__", __init__)

    when_imported("P15", "megatron.core.tensor_parallel.layers", fix)


def _p16_uneven_gather_scatter() -> None:
    """P16 (new): `tensor_parallel/mappings.py` `_gather_along_first_dim(output_split_sizes=...)` and
    `_reduce_scatter_along_first_dim(input_split_sizes=...)` call `all_gather` / `reduce_scatter`
    with uneven tensor lists; gloo rejects them ("ProcessGroupGloo::allgather: invalid tensor size")
    and has no reduce_scatter. Hit by the alltoall MoE dispatcher with expert TP > 1
    (`token_dispatcher.py` dispatch_postprocess / combine_preprocess).
    Checked against megatron-core >=0.16,<0.20 (0.16.1, 0.19.2). CPU only.

    Uneven gather: pad every rank's part to the largest, all-gather, drop the padding. Uneven
    reduce-scatter: all-reduce the whole input and keep this rank's part (more traffic, same sums).
    Even (split sizes None) calls are untouched.
    """

    def fix(mod: types.ModuleType) -> None:
        gather, scatter = mod._gather_along_first_dim, mod._reduce_scatter_along_first_dim

        def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
            if output_split_sizes is None or group is None or group.size() == 1:
                return gather(input_, group, output_split_sizes, use_global_buffer)
            sizes = [int(n) for n in output_split_sizes]
            biggest = max(sizes)
            padded = input_.new_zeros((biggest,) + tuple(input_.shape[1:]))
            padded[: input_.shape[0]] = input_
            parts = [torch.empty_like(padded) for _ in sizes]
            torch.distributed.all_gather(parts, padded.contiguous(), group=group)
            return torch.cat([part[:n] for part, n in zip(parts, sizes)], dim=0)

        def _reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
            if input_split_sizes is None or group is None or group.size() == 1:
                return scatter(input_, group, input_split_sizes, use_global_buffer)
            total = input_.clone()
            torch.distributed.all_reduce(total, group=group)
            start = sum(int(n) for n in input_split_sizes[: group.rank()])
            return total[start:start + int(input_split_sizes[group.rank()])].contiguous()

        rebind_everywhere("P16", mod, "_gather_along_first_dim", _gather_along_first_dim)
        rebind_everywhere("P16", mod, "_reduce_scatter_along_first_dim", _reduce_scatter_along_first_dim)

    when_imported("P16", "megatron.core.tensor_parallel.mappings", fix)

