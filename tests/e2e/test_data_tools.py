"""The data CLIs end to end on the real demo corpus: build_demo_corpus -> train_tokenizer -> preprocess_data.

Each tool runs as users run it (`python tools/X.py` from the repo root, a fresh process); its
outputs are checked against references: ids equal the tokenizer's, the files equal an in-process
single-worker run byte for byte, and Megatron-Core's GPTDataset reads them with our tokenizer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from tests.cli import run_python

from tests.assets import cl100k_path

ROOT = Path(__file__).resolve().parents[2]
needs_apt = pytest.mark.skipif(shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None,
                               reason="apt-get/dpkg-deb not available (not a Debian/Ubuntu machine)")


def tool(name: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    return run_python([sys.executable, f"tools/{name}.py", *args], env=env, timeout=300)   # forked (tests/cli.py)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    # Same cache folder as tests/unit/test_corpus.py: one download per pytest session.
    out_dir = tmp_path_factory.getbasetemp() / "demo_corpus_cache"
    proc = tool("build_demo_corpus", "--output-dir", out_dir)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(out_dir / "demo_corpus.jsonl")
    assert "documents" in proc.stdout and "MB" in proc.stdout
    return out_dir / "demo_corpus.jsonl"


@pytest.fixture(scope="module")
def spm_model(corpus, tmp_path_factory) -> Path:
    prefix = tmp_path_factory.mktemp("tok") / "demo"
    proc = tool("train_tokenizer", "--input", corpus, "--json-keys", "text", "--model-type", "bpe",
                "--vocab-size", 4000, "--output-prefix", prefix)
    assert proc.returncode == 0, proc.stderr
    assert Path(f"{prefix}.model").is_file() and Path(f"{prefix}.vocab").is_file()
    return Path(f"{prefix}.model")


@needs_apt
def test_tokenizer_trained_on_corpus(corpus, spm_model):
    import sentencepiece as spm

    from megatron_rpt.data.tokenizers import build_tokenizer
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(spm_model))
    ref = spm.SentencePieceProcessor(model_file=str(spm_model))
    assert tok.vocab_size == 4000 and ref.id_to_piece(tok.eod) == "<eod>" and ref.id_to_piece(tok.pad) == "<pad>"
    assert ref.is_control(tok.eod) and ref.is_control(tok.pad)
    docs = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
    for text in docs[::100]:
        ids = tok.tokenize(text)
        assert tok.detokenize(ids) == text and tok.eod not in ids and tok.pad not in ids
    # A real BPE on English prose: well under one token per character.
    sample = "".join(docs[::50])
    assert len(tok.tokenize(sample)) < 0.4 * len(sample)


@needs_apt
def test_preprocess_cli_round_trip_and_gpt_dataset(corpus, spm_model, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_rpt.data.preprocess import preprocess
    from megatron_rpt.data.tokenizers import build_tokenizer
    proc = tool("preprocess_data", "--input", corpus, "--json-keys", "text",
                "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", spm_model,
                "--append-eod", "--workers", 2, "--log-interval", 500, "--output-prefix", tmp_path / "cli")
    assert proc.returncode == 0, proc.stderr
    counts = [int(n) for n in re.findall(r"processed (\d+) documents", proc.stdout)]
    assert counts and counts[0] >= 500 and [c // 500 for c in counts] == list(range(1, len(counts) + 1))
    prefix = str(tmp_path / "cli_text_document")
    assert sorted(os.listdir(tmp_path)) == ["cli_text_document.bin", "cli_text_document.idx"]

    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(spm_model))
    docs = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
    ds = IndexedDataset(prefix)
    assert len(ds) == len(docs) and ds.index.dtype == np.uint16
    for i, text in enumerate(docs):
        assert ds[i].tolist() == tok.tokenize(text) + [tok.eod]

    # The CLI with 2 workers writes the same bytes as the library with 1.
    preprocess([str(corpus)], str(tmp_path / "lib"), tokenizer_type="SentencePieceTokenizer",
               tokenizer_model=str(spm_model), append_eod=True, workers=1, progress=False)
    for ext in (".bin", ".idx"):
        assert Path(prefix + ext).read_bytes() == (tmp_path / f"lib_text_document{ext}").read_bytes()

    # Megatron-Core's GPT dataset accepts our tokenizer and reads windows of the documents.
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    seq = 128
    config = GPTDatasetConfig(random_seed=1234, sequence_length=seq, blend=([prefix], None), split="1,0,0",
                              path_to_cache=str(tmp_path / "cache"), tokenizer=tok, reset_position_ids=False,
                              reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [64, 0, 0], lambda: True, config).build()
    assert not [w for w in caught if "pad token id" in str(w.message)]  # pad 0 and eod 3 are distinct ids
    # Exact reference: sample i is the window at (document_index, sample_index, shuffle_index) of the
    # concatenated documents, as Megatron-Core defines it; the tokens must come from our .bin.
    lengths = np.array([len(ds[int(d)]) for d in train.document_index])
    starts = np.concatenate([[0], np.cumsum(lengths)])
    stream = np.concatenate([ds[int(d)] for d in train.document_index]).astype(np.int64)
    saw_eod = False
    for i in range(len(train)):
        doc_pos, offset = train.sample_index[train.shuffle_index[i]]
        window = stream[starts[doc_pos] + offset:starts[doc_pos] + offset + seq + 1]
        sample = train[i]
        assert sample["tokens"].tolist() == window[:-1].tolist() and sample["labels"].tolist() == window[1:].tolist()
        assert bool(sample["loss_mask"].all())  # pad id 0 never occurs in text
        saw_eod |= tok.eod in window
    assert saw_eod  # documents are separated by our eod in what the model sees


def test_preprocess_cli_bad_line_fails_with_location(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "3 1 4"}) + "\n" + '{"text": 5}\n')
    proc = tool("preprocess_data", "--input", src, "--tokenizer-type", "NullTokenizer", "--vocab-size", 10,
                "--output-prefix", tmp_path / "out", "--no-progress")
    assert proc.returncode == 2
    assert f"{src}:2: key 'text' is int, not a string" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


def test_cli_flag_errors(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "hello"}) + "\n")
    proc = tool("preprocess_data", "--input", src, "--tokenizer-type", "SentencePieceTokenizer",
                "--tokenizer-model", tmp_path / "missing.model", "--output-prefix", tmp_path / "out")
    assert proc.returncode == 2 and f"--tokenizer-model: {tmp_path / 'missing.model'} not found" in proc.stderr
    proc = tool("train_tokenizer", "--input", tmp_path / "nothing*.jsonl", "--vocab-size", 100,
                "--output-prefix", tmp_path / "t")
    assert proc.returncode == 2 and "--input: " in proc.stderr and "matches no file" in proc.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"oops"\n')
    proc = tool("train_tokenizer", "--input", bad, "--vocab-size", 100, "--output-prefix", tmp_path / "t")
    assert proc.returncode == 2 and f"{bad}:2: malformed JSON" in proc.stderr
    assert not list(tmp_path.glob("t.*"))
    proc = tool("build_demo_corpus", "--output-dir", tmp_path, "--sources", "shakespeare")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_byte_level_bpe_cli_then_preprocess_skipping_a_bad_line(tmp_path, capsys):
    """train_tokenizer --library huggingface -> preprocess_data with GPT2BPETokenizer, --skip-bad-lines."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron_rpt.data.tokenizers import build_tokenizer
    texts = [f"Line {i}: It is a truth universally acknowledged, that a single man must be in want of a wife."
             for i in range(40)]
    src = tmp_path / "in.jsonl"
    lines = [json.dumps({"text": t}) for t in texts]
    lines[2] = '{"text": unquoted}'
    src.write_text("\n".join(lines) + "\n")
    good = texts[:2] + texts[3:]
    (tmp_path / "train.txt").write_text("\n".join(good) + "\n")
    proc = tool("train_tokenizer", "--library", "huggingface", "--input", tmp_path / "train.txt",
                "--vocab-size", 300, "--output-prefix", tmp_path / "bpe")
    assert proc.returncode == 0, proc.stderr
    bpe = tmp_path / "bpe"
    flags = ["--input", src, "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", bpe / "vocab.json",
             "--merge-file", bpe / "merges.txt", "--append-eod", "--output-prefix", tmp_path / "out", "--no-progress"]
    # In-process main(): the same CLI code without a second Megatron-Core import (~5 s).
    import runpy
    main = runpy.run_path(str(ROOT / "tools" / "preprocess_data.py"))["main"]
    assert main([str(f) for f in flags] + ["--skip-bad-lines"]) == 0
    assert f"skipped 1 bad lines; first: {src}:3: malformed JSON" in capsys.readouterr().out
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=str(bpe / "vocab.json"), merge_file=str(bpe / "merges.txt"))
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    assert [ds[i].tolist() for i in range(len(ds))] == [tok.tokenize(t) + [tok.eod] for t in good]
    assert tok.detokenize(ds[5].tolist()[:-1]) == good[5]


def test_merge_datasets_cli(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron_rpt.data.indexed import IndexedWriter
    shards = tmp_path / "shards"
    docs = {"s0": [[1, 2, 3], [4]], "s1": [[5, 6]], "s2": [[7], [8, 9], [10]]}
    for name, ds in docs.items():
        w = IndexedWriter(str(shards / name), 100)
        for d in ds:
            w.add_document(d)
        w.finalize()
    proc = tool("merge_datasets", "--input", shards, "--output-prefix", tmp_path / "merged")
    assert proc.returncode == 0, proc.stderr
    assert "merged 3 datasets: 6 documents, 6 sequences, 10 tokens" in proc.stdout
    merged = IndexedDataset(str(tmp_path / "merged"))
    assert [merged[i].tolist() for i in range(len(merged))] == [d for n in ("s0", "s1", "s2") for d in docs[n]]
    # Explicit order, and errors: a half pair in the folder, a missing prefix.
    proc = tool("merge_datasets", "--datasets", shards / "s2", shards / "s0", "--output-prefix", tmp_path / "rev")
    assert proc.returncode == 0, proc.stderr
    rev = IndexedDataset(str(tmp_path / "rev"))
    assert [rev[i].tolist() for i in range(len(rev))] == docs["s2"] + docs["s0"]
    (shards / "s1.idx").unlink()
    proc = tool("merge_datasets", "--input", shards, "--output-prefix", tmp_path / "bad")
    assert proc.returncode == 2 and f"{shards / 's1.idx'} missing (its pair exists)" in proc.stderr
    proc = tool("merge_datasets", "--datasets", shards / "s0", shards / "nope", "--output-prefix", tmp_path / "bad")
    assert proc.returncode == 2 and "nope.bin not found" in proc.stderr
    assert not list(tmp_path.glob("bad*"))


def test_preprocess_cli_tiktoken_sentences_partitions(tmp_path):
    """TikTokenizer on cl100k_base, --split-sentences, --partitions and a .gz input through the CLI."""
    import gzip
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron_rpt.data.sentences import SentenceSplitter
    from megatron_rpt.data.tokenizers import build_tokenizer
    ranks = cl100k_path()
    docs = [f"Mr. Bennet had {i} daughters. Mrs. Bennet wanted them married! Was it wise?" * (1 + i % 3)
            for i in range(60)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:40]))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": d}) + "\n" for d in docs[40:]))
    proc = tool("preprocess_data", "--input", tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz",
                "--tokenizer-type", "TikTokenizer", "--tokenizer-model", ranks, "--split-sentences",
                "--append-eod", "--workers", 2, "--partitions", 2, "--chunk-mb", 0.001,
                "--output-prefix", tmp_path / "tt")
    assert proc.returncode == 0, proc.stderr
    tok = build_tokenizer("TikTokenizer", tokenizer_model=ranks)
    split = SentenceSplitter("english")
    ds = IndexedDataset(str(tmp_path / "tt_text_sentence"))
    assert ds.index.dtype == np.int32  # 101,256 ids do not fit uint16
    expected = []
    for d in docs:
        sentences = [tok.tokenize(s) for s in split.split(d)]
        sentences[-1] = sentences[-1] + [tok.eod]
        expected.extend(sentences)
    assert [ds[i].tolist() for i in range(len(ds))] == expected
    assert len(ds.index.document_indices) == len(docs) + 1
    assert split.split(docs[0])[0] == "Mr. Bennet had 0 daughters."
