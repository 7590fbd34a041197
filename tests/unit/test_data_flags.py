"""Training data flags: --data-path blends and --split, --train/valid/test-data-path, --data-cache-path,
and the errors for missing, truncated or foreign data.

Four small prefixes whose token ids tell them apart (A: 0-9, B: 10-19, C: 20-29, D: 30-39; eod 40,
the NullTokenizer of --vocab-size 40) are built with Megatron-Core's real builder, so every sample
says which prefix it came from. Builds run in the pytest process (numpy only, no autograd), except
where a process group is needed (Megatron's BlendedDataset asks for the rank when it writes a
cache; the rank-0 token check broadcasts): those run in forked gloo ranks.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from megatron_rpt.config import ConfigError, parse_args
from megatron_rpt.data.blend import parse_blend
from megatron_rpt.validate import validate_config
from tests.dist_harness import run_ranks
from megatron_rpt.config.arguments import model_flags_argv
from megatron_rpt.config.presets import QWEN3_FAMILY

EOD = 40
RANGES = {"A": 0, "B": 10, "C": 20, "D": 30}
DOCS = 40


def _write(prefix: str, docs: list[list[int]]) -> None:
    from megatron_rpt.data.indexed import AtomicIndexedWriter
    writer = AtomicIndexedWriter(prefix, EOD + 1)
    for ids in docs:
        writer.add_document(ids)
    writer.finalize()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for name, low in RANGES.items():
        _write(str(d / name), [rng.integers(low, low + 10, size=int(rng.integers(20, 60))).tolist() + [EOD]
                               for _ in range(DOCS)])
    return str(d)


def argv(*data_flags: str, train_iters: int = 50, eval_interval: int = 0) -> list[str]:
    return [*model_flags_argv(QWEN3_FAMILY), "--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "64", "--num-attention-heads", "2", "--num-query-groups", "2",
            "--seq-length", "16", "--lr", "1e-3", "--train-iters", str(train_iters), "--global-batch-size", "20",
            "--tokenizer-type", "NullTokenizer", "--vocab-size", "40", "--eval-interval", str(eval_interval),
            "--eval-iters", "2", *data_flags]


def config(*data_flags: str, **kw):
    return validate_config(parse_args(argv(*data_flags, **kw)), 1)


def problems(*data_flags: str, **kw) -> list[str]:
    with pytest.raises(ConfigError) as e:
        config(*data_flags, **kw)
    return e.value.problems


def sources(dataset) -> list[str]:
    """The prefix each sample comes from, read from its token ids (a sample never mixes prefixes)."""
    out = []
    for i in range(len(dataset)):
        s = dataset[i]
        ids = np.concatenate([s["tokens"].numpy(), s["labels"].numpy()[-1:]])
        text = ids[ids != EOD]
        names = {name for name, low in RANGES.items() if ((text >= low) & (text < low + 10)).any()}
        assert len(names) == 1 and ((text >= 0) & (text < 40)).all(), (i, ids)
        out.append(names.pop())
    return out


def build(cfg, **kw):
    from megatron_rpt.data.datasets import build_datasets
    from megatron_rpt.data.tokenizers import NullTokenizer
    return build_datasets(cfg, NullTokenizer(40), create_attention_mask=False, **kw)


def summary(ds) -> dict:
    return {split: (sources(x) if x is not None else None)
            for split, x in (("train", ds.train), ("valid", ds.valid), ("test", ds.test))}


def _build_in_rank(rank, world, argv_):
    return summary(build(validate_config(parse_args(argv_), world)))


def assert_blend(got: list[str], weights: dict[str, float]) -> None:
    """Megatron's blend is deterministic: sample n goes to the prefix with the largest deficit
    w * n - count (helpers.cpp build_blending_indices). So after EVERY prefix of n samples each
    count is within one sample of w * n (measured: 0.7 for 0.3/0.7, 0.8 for 0.2/0.3/0.5); a weight
    off by 0.01 drifts linearly past that bound (10 samples after 1000)."""
    n = np.arange(1, len(got) + 1)
    for name, w in weights.items():
        count = np.cumsum(np.array(got) == name)
        assert np.abs(count - w * n).max() <= 1.0, (name, np.abs(count - w * n).max())
    assert set(got) == set(weights)


# --- blends and --split ----------------------------------------------------------------------

def test_weighted_blend_gives_the_requested_proportions(data):
    p = {k: os.path.join(data, k) for k in RANGES}
    out = summary(build(config("--data-path", "0.3", p["A"], "0.7", p["B"], "--split", "90,10,0",
                               eval_interval=10)))
    assert len(out["train"]) >= 50 * 20 and out["test"] is None
    assert_blend(out["train"], {"A": 0.3, "B": 0.7})
    assert_blend(out["valid"], {"A": 0.3, "B": 0.7})
    # Three prefixes, weights not normalised (Megatron-Core normalises them).
    out = summary(build(config("--data-path", "2", p["A"], "3", p["B"], "5", p["C"], "--split", "1")))
    assert_blend(out["train"], {"A": 0.2, "B": 0.3, "C": 0.5})
    assert out["valid"] is None and out["test"] is None


def test_unweighted_prefix_list_blends_by_size(data):
    # Megatron-LM semantics for '--data-path A B': weights are the datasets' own sample counts.
    assert parse_blend(["a", "b"]) == (["a", "b"], None)
    cfg = config("--data-path", os.path.join(data, "A"), os.path.join(data, "D"), "--split", "1")
    ds = build(cfg)
    got = sources(ds.train)  # one pass over each (exhaustive blend: the run asks for more samples)
    assert got.count("A") == len(ds.train.datasets[0]) and got.count("D") == len(ds.train.datasets[1])
    assert len(got) < 50 * 20


def test_split_divides_each_prefix_by_documents(data):
    cfg = config("--data-path", os.path.join(data, "A"), "--split", "50,25,25", eval_interval=10)
    ds = build(cfg)
    # Megatron-Core cuts the 40 documents at round(share x 40): 0..19, 20..29, 30..39.
    for split, (begin, end) in ((ds.train, (0, 20)), (ds.valid, (20, 30)), (ds.test, (30, 40))):
        assert set(np.unique(split.document_index)) == set(range(begin, end))


# --- --train/valid/test-data-path -------------------------------------------------------------

def test_per_split_paths_draw_only_from_their_own_prefixes(data):
    p = {k: os.path.join(data, k) for k in RANGES}
    # --split 1,0,0 would leave no validation data: it is ignored with per-split paths.
    out = summary(build(config("--train-data-path", "0.25", p["A"], "0.75", p["B"], "--valid-data-path", p["C"],
                               "--test-data-path", p["D"], "--split", "1,0,0", eval_interval=10)))
    assert_blend(out["train"], {"A": 0.25, "B": 0.75})
    assert set(out["valid"]) == {"C"} and set(out["test"]) == {"D"}


def test_split_without_a_path_has_no_dataset(data):
    from megatron_rpt.data.datasets import SplitDatasets, require_validation_set
    cfg = config("--train-data-path", os.path.join(data, "A"), "--test-data-path", os.path.join(data, "D"))
    ds = build(cfg)
    assert ds.valid is None and set(sources(ds.test)) == {"D"} and set(sources(ds.train)) == {"A"}
    require_validation_set(cfg, ds)  # no evaluation asked for: fine
    # Evaluation asked for: validation names the missing flag ...
    p = problems("--train-data-path", os.path.join(data, "A"), eval_interval=10)
    assert p == ["--eval-interval 10 with --eval-iters 2 asks for validation, but there is no "
                 "--valid-data-path; give one or set --eval-interval 0"]
    # ... and so does the training loop's own check (for callers that skip file validation).
    cfg.training.eval_interval = 10
    with pytest.raises(ConfigError, match=r"no validation set \(no --valid-data-path was given\); "
                                          "set --eval-interval 0"):
        require_validation_set(cfg, ds)
    cfg = config("--data-path", os.path.join(data, "A"), "--split", "100,0,0")
    cfg.training.eval_interval = 10
    with pytest.raises(ConfigError, match=r"\(--split 100,0,0 gives the validation split no data\)"):
        require_validation_set(cfg, SplitDatasets(ds.train, None, None))


# --- --data-cache-path ------------------------------------------------------------------------

def _cache_state(cache: str) -> dict:
    return {f: os.stat(os.path.join(cache, f)).st_mtime_ns for f in sorted(os.listdir(cache))}


def _build_without_index_builders(rank, world, argv_, cache):
    """A second build whose index builders all raise: it can only succeed from the cache."""
    from megatron.core.datasets import gpt_dataset, helpers

    def boom(*args, **kwargs):
        raise AssertionError("an index was rebuilt instead of read from --data-cache-path")
    for module, name in ((helpers, "build_sample_idx"), (helpers, "build_blending_indices"),
                         (gpt_dataset, "_build_document_index"), (gpt_dataset, "_build_shuffle_index")):
        setattr(module, name, boom)
    return _build_in_rank(rank, world, argv_)


def test_data_cache_path_holds_and_reuses_the_indices(data, tmp_path):
    # A private copy of the data: the default cache location is beside the prefix.
    for name in ("A", "B"):
        for ext in (".bin", ".idx"):
            shutil.copy(os.path.join(data, name + ext), tmp_path / (name + ext))
    cache = str(tmp_path / "cache" / "indices")  # created by Megatron-Core
    flags = argv("--data-path", "0.3", str(tmp_path / "A"), "0.7", str(tmp_path / "B"), "--split", "90,10,0",
                 "--data-cache-path", cache, eval_interval=10)
    first = run_ranks(_build_in_rank, 1, flags)[0]
    files = _cache_state(cache)
    kinds = sorted({f.split("-", 1)[1] for f in files})
    assert kinds == sorted(f"{cls}-{split}-{what}" for split in ("train", "valid")
                           for cls, whats in (("GPTDataset", ("description.txt", "document_index.npy",
                                                              "sample_index.npy", "shuffle_index.npy")),
                                              ("BlendedDataset", ("description.txt", "dataset_index.npy",
                                                                  "dataset_sample_index.npy")))
                           for what in whats)
    assert len([f for f in files if "GPTDataset-train-document_index" in f]) == 2  # one per prefix
    assert sorted(os.listdir(tmp_path)) == ["A.bin", "A.idx", "B.bin", "B.idx", "cache"]  # nothing beside the data
    second = run_ranks(_build_without_index_builders, 1, flags, cache)[0]
    assert second == first
    assert _cache_state(cache) == files  # read, not rewritten


# --- errors -----------------------------------------------------------------------------------

def test_blend_syntax_errors():
    for items, text in ((["0.5", "a", "b"], "--data-path: 3 items, with numbers among them: expected weight/prefix"),
                        (["-1", "a", "1", "b"], "--data-path: negative weight -1.0 for a"),
                        (["0", "a", "1", "b"], "--data-path: zero weight for a (Megatron-Core cannot blend it)"),
                        (["a", "0.5"], "--data-path: item 1 'a' is not a weight"),
                        (["0.5", "1", "0.5", "b"], "--data-path: item 2 '1' is a number where a prefix is expected"),
                        (["nan", "a"], "--data-path: weight nan for a is not a finite number")):
        with pytest.raises(ValueError) as e:
            parse_blend(items)
        assert str(e.value).startswith(text), (items, str(e.value))
    # The same through validation, naming the per-split flag.
    p = problems("--train-data-path", "0.5", "a", "b", "--valid-data-path", "-2", "c")
    assert "--train-data-path: 3 items, with numbers among them: expected weight/prefix pairs 'W1 PREFIX1 " \
           "W2 PREFIX2 ...' (or prefixes only)" in p
    assert "--valid-data-path: negative weight -2.0 for c" in p


def test_flag_combinations(data):
    a = os.path.join(data, "A")
    p = problems("--data-path", a, "--train-data-path", a, "--test-data-path", a)
    assert p == ["--data-path and --train-data-path/--test-data-path are mutually exclusive: give one blend "
                 "divided by --split, or one blend per split"]
    p = problems("--valid-data-path", a, "--test-data-path", a)
    assert p == ["--valid-data-path/--test-data-path without --train-data-path: give the training blend too"]
    p = problems("--data-path", a, "--split", "100,0,0", eval_interval=10)
    assert p == ["--eval-interval 10 with --eval-iters 2 asks for validation, but --split 100,0,0 gives the "
                 "validation split no data; give it a share (e.g. --split 969,30,1) or set --eval-interval 0"]
    assert config("--data-path", a, "--split", "100,0,0").data.split == "100,0,0"  # no evaluation: fine


def test_missing_bin_or_idx_names_the_file_and_position(data, tmp_path):
    a = os.path.join(data, "A")
    shutil.copy(a + ".idx", tmp_path / "only_idx.idx")
    shutil.copy(a + ".bin", tmp_path / "only_bin.bin")
    p = problems("--train-data-path", "1", a, "1", str(tmp_path / "only_idx"),
                 "--valid-data-path", str(tmp_path / "only_bin"), eval_interval=10)
    assert p == [f"--train-data-path prefix 2 of 2: {tmp_path / 'only_idx.bin'} not found "
                 "(run tools/preprocess_data.py to create it)",
                 f"--valid-data-path: {tmp_path / 'only_bin.idx'} not found (run tools/preprocess_data.py "
                 "to create it)"]


def test_truncated_longer_or_foreign_files(data, tmp_path):
    a = os.path.join(data, "A")
    size = os.path.getsize(a + ".bin")
    for name in ("short", "long", "junk"):
        shutil.copy(a + ".bin", tmp_path / f"{name}.bin")
        shutil.copy(a + ".idx", tmp_path / f"{name}.idx")
    with open(tmp_path / "short.bin", "r+b") as f:
        f.truncate(size - 2)  # one uint16 token short
    with open(tmp_path / "long.bin", "ab") as f:
        f.write(b"\0\0")
    (tmp_path / "junk.idx").write_bytes(b"not an index at all")
    tokens = size // 2
    p = problems("--data-path", "1", str(tmp_path / "short"), "1", str(tmp_path / "long"), "1", str(tmp_path / "junk"))
    assert p[0] == (f"--data-path prefix 1 of 3: {tmp_path / 'short.bin'} has {size - 2} bytes but "
                    f"{tmp_path / 'short.idx'} describes {size} ({tokens} uint16 tokens in {DOCS} documents): "
                    "the .bin is truncated; recreate the pair with tools/preprocess_data.py")
    assert p[1].startswith(f"--data-path prefix 2 of 3: {tmp_path / 'long.bin'} has {size + 2} bytes") \
        and "is longer than its index" in p[1]
    assert p[2].startswith(f"--data-path prefix 3 of 3: {tmp_path / 'junk.idx'} is not a readable Megatron "
                           "index file (AssertionError: bad header")
    assert len(p) == 3


def test_split_share_with_no_documents_is_an_error_not_a_hang(data):
    # 40 documents: the default 969,30,1 gives the test split round(0.999 * 40) .. 40 = nothing,
    # and Megatron-Core's GPTDataset would loop forever counting epochs of zero tokens.
    p = problems("--data-path", os.path.join(data, "A"))
    assert p == [f"--data-path: --split 969,30,1 gives the test split 0.001 of {os.path.join(data, 'A')}'s 40 "
                 "documents, which rounds to none (Megatron-Core would loop forever building it); give the "
                 "test split a larger share or 0, or use more data"]


def test_data_cache_path_must_be_a_writable_folder(data, tmp_path):
    (tmp_path / "file").write_text("x")
    p = problems("--data-path", os.path.join(data, "A"), "--split", "1", "--data-cache-path", str(tmp_path / "file"))
    assert p == [f"--data-cache-path: {tmp_path / 'file'} exists and is not a folder"]


def test_token_ids_beyond_the_vocabulary(tmp_path):
    from megatron_rpt.data.validate import check_token_ids, sample_windows
    docs = [[i % 10] * 30 + [EOD] for i in range(400)]  # 400 documents of 31 tokens
    n = 400 * 31
    prefix = str(tmp_path / "E")
    _write(prefix, docs)
    assert check_token_ids(prefix, "--data-path", 41) == []  # NullTokenizer --vocab-size 40: all fit
    # Vocabulary 25 (ids 0..24): the largest offending id, its first position, the whole small file.
    assert check_token_ids(prefix, "--train-data-path prefix 3 of 3", 25) == [
        f"--train-data-path prefix 3 of 3: {prefix}.bin holds token id 40 (token 30, document 0) but the "
        "tokenizer's vocabulary size is 25 (ids 0..24): the data was tokenized with another tokenizer; pass "
        "the one it was preprocessed with (--tokenizer-type/--tokenizer-model, or --vocab-size for "
        f"NullTokenizer) or re-run tools/preprocess_data.py (scanned {n} of {n} tokens)"]
    # A bounded sample: equal windows from the first token to the last.
    windows = sample_windows(n, 32, 4)
    assert windows[0] == (0, 8) and windows[-1] == (n - 8, n) and all(b - a == 8 for a, b in windows)
    docs[-1][-2] = 45  # in the last window
    docs[200][5] = 50  # between windows
    _write(prefix, docs)
    msg = check_token_ids(prefix, "--data-path", 41, sample_tokens=32, windows=4)
    assert len(msg) == 1 and f"holds token id 45 (token {n - 2}, document 399)" in msg[0]
    assert msg[0].endswith("(scanned 32 of 12400 tokens)")
    # The default sample reads all of a small file, so it finds the larger id in the middle.
    msg = check_token_ids(prefix, "--data-path", 41)
    assert len(msg) == 1 and f"holds token id 50 (token {200 * 31 + 5}, document 200)" in msg[0]


def _build_with_small_vocab(rank, world, argv_):
    from megatron_rpt.data import datasets
    from megatron_rpt.data.tokenizers import NullTokenizer
    if rank != 0:  # only rank 0 reads the data; the others get its answer
        def boom(*args, **kwargs):
            raise AssertionError("rank != 0 scanned the data")
        datasets.check_token_ids_all = boom
    cfg = validate_config(parse_args(argv_), world)
    try:
        datasets.build_datasets(cfg, NullTokenizer(15), create_attention_mask=False)
    except ConfigError as e:
        return e.problems
    return None


def test_vocab_mismatch_fails_on_every_rank_before_building(data):
    b = os.path.join(data, "B")  # ids 10..19 and eod 40; NullTokenizer(15) has ids 0..15
    out = run_ranks(_build_with_small_vocab, 2, argv("--train-data-path", b))
    assert out[0] == out[1] and len(out[0]) == 1
    assert out[0][0].startswith(f"--train-data-path: {b}.bin holds token id 40 (token ")
    assert "but the tokenizer's vocabulary size is 16 (ids 0..15)" in out[0][0]


# --- --num-workers and --no-mmap-bin-files ------------------------------------------------------

def _batches(dataset, dp_rank: int, consumed: int, count: int, num_workers: int, cyclic: bool = False):
    """Up to `count` micro-batches (2 samples, data-parallel size 2) from `consumed` on, and the counter after."""
    from megatron_rpt.data.datasets import MicroBatchIterator
    it = MicroBatchIterator(dataset, 2, dp_rank, 2, consumed, cyclic=cyclic, num_workers=num_workers)
    out = []
    try:
        for _ in range(count):
            out.append(next(it))
    except StopIteration:
        pass
    finally:
        it.close()
    return out, it.consumed_samples


def _reader_cases(rank, world, cfg):
    """Batches read in the training process and by two workers, with Megatron-LM's sampler order as the
    reference: micro-batch k of DP rank r holds samples consumed + 4k + 2r + (0, 1), modulo the length when
    cyclic; a non-cyclic iterator stops before a batch that would run past the end."""
    import torch
    ds = build(cfg)
    n_train, n_valid = len(ds.train), len(ds.valid)
    cases = [(ds.train, 1, 60, 4, False),                   # resumed at 60 consumed samples
             (ds.train, 0, n_train - 9, 5, False),          # runs out after 2 batches
             (ds.valid, 1, n_valid - 6, 3, True)]           # wraps around
    for dataset, r, consumed, count, cyclic in cases:
        n = len(dataset)
        ref = []
        for k in range(count):
            idx = [consumed + 4 * k + 2 * r + j for j in (0, 1)]
            if not cyclic and idx[-1] >= n:
                break
            ref.append(torch.utils.data.default_collate([dataset[i % n] for i in idx]))
        for workers in (0, 2):
            got, after = _batches(dataset, r, consumed, count, workers, cyclic)
            assert len(got) == len(ref) and after == consumed + 4 * len(ref), (workers, consumed, len(got), after)
            for a, b in zip(got, ref):
                assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (workers, consumed)
    return True


def test_workers_give_the_in_process_batches(data):
    """--num-workers 2 against in-process reading (and both against the sampler's index formula): fresh,
    resumed from a consumed-samples offset, at the end of the training split, and the cyclic validation
    iterator wrapping around; the consumed counter counts batches handed out, not read ahead."""
    p = {k: os.path.join(data, k) for k in RANGES}
    cfg = config("--data-path", "0.3", p["A"], "0.7", p["B"], "--split", "90,10,0", eval_interval=10)
    assert run_ranks(_reader_cases, 1, cfg) == [True]


def _tokens_mmap_or_not(rank, world, cfgs):
    ds = [build(cfg) for cfg in cfgs]
    mmap = [d.train.dataset.mmap for d in ds]
    tokens = [[x.train[i]["tokens"].tolist() for i in range(len(x.train))] for x in ds]
    return mmap, tokens[0] == tokens[1], len(tokens[0])


def test_no_mmap_bin_files_reads_the_same_tokens(data):
    """--no-mmap-bin-files reaches Megatron-Core's IndexedDataset (file reads instead of a memory map) and
    every training sample is the same as with the map."""
    p = {k: os.path.join(data, k) for k in RANGES}
    cfgs = [config("--data-path", p["A"], "--split", "90,10,0", *extra, train_iters=5)
            for extra in ([], ["--no-mmap-bin-files"])]
    assert [c.data.mmap_bin_files for c in cfgs] == [True, False]
    mmap, same, n = run_ranks(_tokens_mmap_or_not, 1, cfgs)[0]
    assert mmap == [True, False] and same and n >= 5 * 20
