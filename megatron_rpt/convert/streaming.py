"""Tensor-at-a-time reading and writing of Megatron-Core torch_dist checkpoints (for conversion).

Conversion must work for checkpoints far larger than the converting machine's memory (a 10B MoE
trained on GPUs, converted on a 24 GB CPU box), so neither direction materialises the model:

- Writing (`LazySaveStrategy`): the model is built on the meta device and given *untouched*
  CPU storage (`Module.to_empty`: virtual memory only, no resident pages), so Megatron-Core builds
  its usual sharded state dict (factories, prepended layer/expert axes, common state) for free.
  The strategy hands that state dict to torch.distributed.checkpoint with Megatron-Core's own save
  planner and torch's `FileSystemWriter`, which asks the planner for one tensor at a time while it
  writes (`_SerialCpuLoader`; on CUDA hosts `_OverlappingCpuLoader` runs at most
  `per_thread_copy_ahead` bytes ahead). Our planner resolves each requested chunk, a view of one
  parameter's placeholder storage, to the same view of that parameter's real value, produced on
  demand by a callback (e.g. converted from Hugging Face tensors) and dropped after it is written.
  The files are the ones Megatron-Core's torch_dist strategy writes (same planner, same metadata,
  same `metadata.json`/common state written by `dist_checkpointing.save`); Megatron-Core's own
  writer cannot do this because it resolves every tensor before writing (for async saves).
- Reading (`read_tensors`): one `dist_checkpointing.load` per parameter, with a sharded state
  dict holding only that entry with a fresh buffer. torch.distributed.checkpoint reads only the requested byte ranges of the files, so
  any saved TP/PP/EP layout is read one parameter at a time. One layer of a layer-stacked tensor
  cannot be requested the way the model describes it (prepended layer/expert axes become a torch
  ShardedTensor whose metadata lists every layer as local), so each requested chunk is described
  as the same chunk of the same global tensor without prepended axes (`_without_prepended_axes`).

Peak memory is therefore about the largest parameter (plus its conversion) and whatever the caller
keeps, e.g. one output shard.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Iterable, Iterator

import torch
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.planner import WriteItemType


def placeholder_model(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Give a meta-device model untouched CPU storage; its state-dict tensors by name.

    Buffers are zeroed (the initial value of every buffer in our models: router expert bias and
    token counts); they are small and are the only state a checkpoint needs that no mapping gives.
    """
    module.to_empty(device="cpu")
    with torch.no_grad():
        for buffer in module.buffers():
            buffer.zero_()
    return {k: v for k, v in module.state_dict().items() if torch.is_tensor(v)}


class _LazyPlanner(MCoreSavePlanner):
    def __init__(self, resolve: Callable[[torch.Tensor], torch.Tensor], **kwargs):
        super().__init__(**kwargs)
        self._resolve = resolve

    def resolve_data(self, write_item):
        data = super().resolve_data(write_item)
        if write_item.type == WriteItemType.BYTE_IO:
            return data
        return self._resolve(data)


class LazySaveStrategy(TorchDistSaveShardedStrategy):
    """torch_dist save strategy that produces each parameter's value only when it is written.

    `placeholders`: the model's state-dict tensors (from `placeholder_model`), whose storages the
    sharded state dict views; `produce(name)`: the real value of state-dict entry `name`, same
    shape and dtype as its placeholder. Values are produced once each (one is cached, because a
    gated fc1 is written as two chunks).
    """

    def __init__(self, placeholders: dict[str, torch.Tensor], produce: Callable[[str], torch.Tensor]):
        super().__init__("torch_dist", 1)
        self._by_storage = {t.untyped_storage().data_ptr(): (name, t) for name, t in placeholders.items()
                            if t.numel()}
        self._produce = produce
        self._cached: tuple[str, torch.Tensor] | None = None

    def _real(self, view: torch.Tensor) -> torch.Tensor:
        entry = self._by_storage.get(view.untyped_storage().data_ptr())
        if entry is None:  # not a parameter placeholder (e.g. a tensor in the common state)
            return view
        name, placeholder = entry
        if self._cached is None or self._cached[0] != name:
            value = self._produce(name)
            if value.shape != placeholder.shape or value.dtype != placeholder.dtype:
                raise ValueError(f"{name}: produced {tuple(value.shape)} {value.dtype}, the model has "
                                 f"{tuple(placeholder.shape)} {placeholder.dtype}")
            self._cached = (name, value.contiguous())
        value = self._cached[1]
        offset = view.storage_offset() - placeholder.storage_offset() + value.storage_offset()
        return value.as_strided(view.shape, view.stride(), offset)

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict, self.keep_only_main_replica)
        pyt_state_dict = mcore_to_pyt_state_dict(sharded_state_dict, False)
        writer = FileSystemWriter(str(checkpoint_dir), single_file_per_rank=True, sync_files=True, thread_count=1)
        planner = _LazyPlanner(self._real, dedup_replicated_tensors=not self.keep_only_main_replica,
                               flatten_state_dict=False)
        dcp_save(pyt_state_dict, storage_writer=writer, planner=planner)
        self._cached = None


def read_tensors(load: Callable[[dict], dict], sharded_state_dict: dict,
                 names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for each of `names`, one checkpoint read per parameter.

    `sharded_state_dict`: the model's (built on the meta device is enough: only shapes, dtypes
    and sharding are used); `load(sub_state_dict)`: e.g. `dist_checkpointing.load` of one
    checkpoint folder (measured ~5 ms per call on top of the bytes read).
    """
    for name in names:
        entry = copy.copy(sharded_state_dict[name])
        entry.data = buffer = torch.empty(entry.data.shape, dtype=entry.data.dtype, device="cpu")
        request = {name: entry}
        apply_factories(request)  # e.g. a gated fc1 becomes its [gate; up] chunks, views of the buffer
        dict_list_map_inplace(_without_prepended_axes, request)
        load(request)  # fills the buffer in place
        yield name, buffer


def _without_prepended_axes(entry):
    """The same chunk of the same checkpoint tensor with the prepended axes made explicit (size-1
    local dimensions of a view of the same data)."""
    if not isinstance(entry, ShardedTensor) or not entry.prepend_axis_num:
        return entry
    ones = (1,) * entry.prepend_axis_num
    return dataclasses.replace(entry, data=entry.data.view(ones + tuple(entry.data.shape)),
                               local_shape=ones + tuple(entry.local_shape), prepend_axis_num=0)
