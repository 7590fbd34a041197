"""Training datasets: Megatron-Core GPT dataset builders + a resumable micro-batch iterator.

Datasets come from `BlendedMegatronDatasetBuilder`: one blend divided by `--split`, or one blend
per split (`--train/valid/test-data-path`, Megatron's `blend_per_split`), index caches in
`--data-cache-path`. Before building, the token ids are checked against the tokenizer
(`data.validate`, a bounded sample, on rank 0 only).
Every rank indexes the dataset itself (no broadcast): indices are a pure function of (consumed
samples, data-parallel rank), which is what makes resumption exact. The samples of those indices are
read by a torch DataLoader, in `--num-workers` worker processes or in the training process; the
batches are the same either way (the index order is the iterator's, not the workers').
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

from megatron_rpt.config.schedule import samples_after
from megatron_rpt.config.schema import RunConfig
from megatron_rpt.config.validation import ConfigError
from megatron_rpt.data.blend import data_prefixes, parse_blend, parse_split
from megatron_rpt.data.validate import check_token_ids_all


@dataclass
class SplitDatasets:
    train: Optional[torch.utils.data.Dataset]
    valid: Optional[torch.utils.data.Dataset]
    test: Optional[torch.utils.data.Dataset]


def split_sample_counts(cfg: RunConfig) -> list[int]:
    """Samples each split must provide for the whole run (as Megatron-LM computes them)."""
    t = cfg.training
    train = samples_after(cfg, t.train_iters)   # train_iters x global batch, less under --rampup-batch-size
    evals = (t.train_iters // t.eval_interval + 1) * t.eval_iters if t.eval_interval else 0
    return [train, evals * t.global_batch_size, t.eval_iters * t.global_batch_size]


def gpt_dataset_config(cfg: RunConfig, tokenizer, *, create_attention_mask: bool) -> GPTDatasetConfig:
    """Megatron's config: `blend` + `split` for --data-path, else `blend_per_split` (split None:
    Megatron-Core rejects both); neither for --mock-data."""
    d = cfg.data
    blend = blend_per_split = None
    split: Optional[str] = ",".join(str(x) for x in parse_split(d.split))
    if d.data_path and not d.mock_data:
        blend = parse_blend(d.data_path)
    elif not d.mock_data:
        blend_per_split = [parse_blend(items, flag) if items else None for flag, items in
                           (("--train-data-path", d.train_data_path), ("--valid-data-path", d.valid_data_path),
                            ("--test-data-path", d.test_data_path))]
        split = None
    return GPTDatasetConfig(
        random_seed=cfg.training.seed,
        sequence_length=cfg.model.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=split,
        path_to_cache=d.data_cache_path,
        tokenizer=tokenizer,
        reset_position_ids=d.reset_position_ids,
        reset_attention_mask=d.reset_attention_mask,
        eod_mask_loss=d.eod_mask_loss,
        create_attention_mask=create_attention_mask,
        mmap_bin_files=d.mmap_bin_files,
    )


def _on_rank_0(check) -> list[str]:
    """Run `check()` on global rank 0 only and give every rank its answer, so that all ranks raise
    together (and a shared file system is read once, not once per rank)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return check()
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = check()
        except Exception as e:  # noqa: BLE001 - other ranks wait in the broadcast: answer them
            box[0] = [f"checking the data failed: {type(e).__name__}: {e}"]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def build_datasets(cfg: RunConfig, tokenizer, *, create_attention_mask: bool = True,
                   check_tokens: bool = True) -> SplitDatasets:
    """Train/valid/test GPT datasets (mock ones with --mock-data); a split without data is None.

    With `check_tokens`, a sample of every prefix is first checked for ids outside the
    tokenizer's vocabulary (`ConfigError` naming the prefix, the id and the vocabulary size).
    """
    if check_tokens:
        check_data_vocabulary(cfg, tokenizer)
    config = gpt_dataset_config(cfg, tokenizer, create_attention_mask=create_attention_mask)
    cls = MockGPTDataset if cfg.data.mock_data else GPTDataset
    train, valid, test = BlendedMegatronDatasetBuilder(
        cls, split_sample_counts(cfg), lambda: True, config).build()
    return SplitDatasets(train, valid, test)


def check_data_vocabulary(cfg: RunConfig, tokenizer) -> None:
    """`ConfigError` (on every rank) when a sample of the data holds ids outside the tokenizer's vocabulary.

    Rank 0 reads the sample; the verdict is broadcast so all ranks fail together.
    """
    if cfg.data.mock_data:
        return
    prefixes = data_prefixes(cfg.data)
    problems = _on_rank_0(lambda: check_token_ids_all(prefixes, tokenizer.vocab_size))
    if problems:
        raise ConfigError(problems)


def require_validation_set(cfg: RunConfig, datasets: SplitDatasets) -> None:
    """`ConfigError` naming the flags when evaluation is asked for but there is no validation data."""
    t, d = cfg.training, cfg.data
    if not (t.eval_interval > 0 and t.eval_iters > 0):
        return
    if datasets.valid is not None and len(datasets.valid) > 0:
        return
    why = ("no --valid-data-path was given" if d.train_data_path and not d.data_path
           else f"--split {d.split} gives the validation split no data")
    raise ConfigError([f"--eval-interval {t.eval_interval} with --eval-iters {t.eval_iters} asks for "
                       f"validation, but there is no validation set ({why}); set --eval-interval 0 "
                       "to train without validation"])


class MicroBatchIterator(Iterator[dict]):
    """Yields this data-parallel rank's micro-batches in Megatron-LM's pretraining sampler order.

    Global sample order is 0, 1, 2, ...; each group of micro_batch_size x dp_size consecutive
    samples is one micro-batch step, of which rank r takes slice [r*mbs, (r+1)*mbs).
    `consumed_samples` counts samples consumed by ALL data-parallel ranks (saved in checkpoints);
    it counts the batches handed out, not those the workers have read ahead.
    With `cyclic=True` (validation) indices wrap around the dataset.

    The samples are read and collated by a DataLoader over `_BatchIndices` (Megatron-LM's
    build_pretraining_data_loader: a batch sampler, `num_workers` processes, pinned memory on a GPU).
    It starts at the first `next()`, so a rank or split that never reads starts no workers, and it
    lives until `close()`: a validation iterator kept across evaluations starts its workers once.
    """

    def __init__(self, dataset, micro_batch_size: int, dp_rank: int, dp_size: int,
                 consumed_samples: int = 0, cyclic: bool = False, num_workers: int = 0,
                 pin_memory: bool = False):
        if dataset is None:
            raise ValueError("no dataset for this split (check --split or --train/valid/test-data-path)")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed_samples = consumed_samples
        self.cyclic = cyclic
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self._batches: Optional[Iterator[dict]] = None

    def __next__(self) -> dict:
        if self._batches is None:
            loader = torch.utils.data.DataLoader(
                self.dataset, batch_sampler=_BatchIndices(self, self.consumed_samples),
                num_workers=self.num_workers, pin_memory=self.pin_memory,
                collate_fn=torch.utils.data.default_collate)
            self._batches = iter(loader)
        batch = next(self._batches)
        self.consumed_samples += self.micro_batch_size * self.dp_size
        return batch

    def close(self) -> None:
        """Stop the worker processes (a later `next()` starts new ones at `consumed_samples`)."""
        self._batches = None


class _BatchIndices:
    """The dataset indices of each micro-batch of a `MicroBatchIterator`, from `consumed` on."""

    def __init__(self, it: MicroBatchIterator, consumed: int):
        self.it, self.consumed = it, consumed

    def __iter__(self):
        it, n = self.it, len(self.it.dataset)
        consumed = self.consumed
        while True:
            start = consumed + it.dp_rank * it.micro_batch_size
            indices = range(start, start + it.micro_batch_size)
            if not it.cyclic and indices[-1] >= n:
                return
            yield [i % n for i in indices]
            consumed += it.micro_batch_size * it.dp_size
