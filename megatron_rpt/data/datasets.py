"""Training datasets: Megatron-Core GPT dataset builders + a resumable micro-batch iterator.

Datasets come from `BlendedMegatronDatasetBuilder` (weighted blends, `--split`, index caches).
Every rank indexes the memory-mapped dataset itself (no broadcast): indices are a pure function
of (consumed samples, data-parallel rank), which is what makes resumption exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

from megatron_rpt.config.schema import RunConfig
from megatron_rpt.config.validation import parse_blend, parse_split


@dataclass
class SplitDatasets:
    train: Optional[torch.utils.data.Dataset]
    valid: Optional[torch.utils.data.Dataset]
    test: Optional[torch.utils.data.Dataset]


def split_sample_counts(cfg: RunConfig) -> list[int]:
    """Samples each split must provide for the whole run (as Megatron-LM computes them)."""
    t = cfg.training
    train = t.train_iters * t.global_batch_size
    evals = (t.train_iters // t.eval_interval + 1) * t.eval_iters if t.eval_interval else 0
    return [train, evals * t.global_batch_size, t.eval_iters * t.global_batch_size]


def gpt_dataset_config(cfg: RunConfig, tokenizer, *, create_attention_mask: bool) -> GPTDatasetConfig:
    d = cfg.data
    blend = None if d.mock_data else parse_blend(d.data_path)
    split = ",".join(str(x) for x in parse_split(d.split))
    return GPTDatasetConfig(
        random_seed=cfg.training.seed,
        sequence_length=cfg.model.seq_length,
        blend=blend,
        split=split,
        path_to_cache=d.data_cache_path,
        tokenizer=tokenizer,
        reset_position_ids=d.reset_position_ids,
        reset_attention_mask=d.reset_attention_mask,
        eod_mask_loss=d.eod_mask_loss,
        create_attention_mask=create_attention_mask,
    )


def build_datasets(cfg: RunConfig, tokenizer, *, create_attention_mask: bool = True) -> SplitDatasets:
    """Train/valid/test GPT datasets (mock ones with --mock-data)."""
    config = gpt_dataset_config(cfg, tokenizer, create_attention_mask=create_attention_mask)
    cls = MockGPTDataset if cfg.data.mock_data else GPTDataset
    train, valid, test = BlendedMegatronDatasetBuilder(
        cls, split_sample_counts(cfg), lambda: True, config).build()
    return SplitDatasets(train, valid, test)


class MicroBatchIterator(Iterator[dict]):
    """Yields this data-parallel rank's micro-batches in Megatron-LM's pretraining sampler order.

    Global sample order is 0, 1, 2, ...; each group of micro_batch_size x dp_size consecutive
    samples is one micro-batch step, of which rank r takes slice [r*mbs, (r+1)*mbs).
    `consumed_samples` counts samples consumed by ALL data-parallel ranks (saved in checkpoints).
    With `cyclic=True` (validation) indices wrap around the dataset.
    """

    def __init__(self, dataset, micro_batch_size: int, dp_rank: int, dp_size: int,
                 consumed_samples: int = 0, cyclic: bool = False):
        if dataset is None:
            raise ValueError("no dataset for this split (check --split)")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed_samples = consumed_samples
        self.cyclic = cyclic

    def __next__(self) -> dict:
        n = len(self.dataset)
        start = self.consumed_samples + self.dp_rank * self.micro_batch_size
        indices = range(start, start + self.micro_batch_size)
        if not self.cyclic and indices[-1] >= n:
            raise StopIteration(f"dataset exhausted at sample {indices[-1]} of {n}")
        samples = [self.dataset[i % n] for i in indices]
        self.consumed_samples += self.micro_batch_size * self.dp_size
        return torch.utils.data.default_collate(samples)
