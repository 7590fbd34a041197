"""preprocess_data: ids in .bin/.idx equal the tokenizer's, worker-count invariance, bad input, atomic output."""

import gzip
import json
import os

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_rpt.data.preprocess import BadInputError, preprocess
from megatron_rpt.data.tokenizers import build_tokenizer, train_sentencepiece

DOCS = [f"Document {i}: " + "It is a truth universally acknowledged. " * (1 + i % 7) + "Ünïcode ☃." for i in range(300)]


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    return str(train_sentencepiece(DOCS, str(d / "spm"), vocab_size=300))


def write_jsonl(path, docs, key="text"):
    with open(path, "w") as f:
        for doc in docs:
            f.write(json.dumps({key: doc, "other": 1}) + "\n")
    return str(path)


def run(inputs, prefix, spm, **kw):
    kw.setdefault("append_eod", True)
    return preprocess(inputs, str(prefix), tokenizer_type="SentencePieceTokenizer", tokenizer_model=spm,
                      progress=False, **kw)


def test_round_trip_ids_equal_tokenizer(tmp_path, spm):
    src = write_jsonl(tmp_path / "a.jsonl", DOCS)
    stats = run([src], tmp_path / "out", spm)
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=spm)
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    assert len(ds) == len(DOCS) == stats.documents
    assert ds.index.dtype == np.uint16
    for i, doc in enumerate(DOCS):
        assert ds[i].tolist() == tok.tokenize(doc) + [tok.eod]
    assert stats.tokens == sum(len(ds[i]) for i in range(len(ds)))


def test_no_eod_several_inputs_glob_and_gzip(tmp_path, spm):
    write_jsonl(tmp_path / "part1.jsonl", DOCS[:100])
    with gzip.open(tmp_path / "part2.jsonl.gz", "wt") as f:
        for doc in DOCS[100:]:
            f.write(json.dumps({"text": doc}) + "\n")
    run([str(tmp_path / "part1.jsonl"), str(tmp_path / "part2.jsonl.gz")], tmp_path / "out", spm, append_eod=False)
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=spm)
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    assert [ds[i].tolist() for i in range(len(ds))] == [tok.tokenize(d) for d in DOCS]
    run([str(tmp_path / "part*")], tmp_path / "glob", spm, append_eod=False)
    assert open(tmp_path / "glob_text_document.bin", "rb").read() == open(tmp_path / "out_text_document.bin", "rb").read()


def test_worker_count_does_not_change_output(tmp_path, spm):
    src = write_jsonl(tmp_path / "a.jsonl", DOCS)
    run([src], tmp_path / "w1", spm, workers=1, chunk_bytes=37)
    run([src], tmp_path / "w2", spm, workers=2, chunk_bytes=4096, partitions=3)
    for ext in (".bin", ".idx"):
        assert open(f"{tmp_path}/w1_text_document{ext}", "rb").read() == open(f"{tmp_path}/w2_text_document{ext}", "rb").read()


@pytest.mark.parametrize("line,reason", [
    ('{"text": "ok"', "malformed JSON"),
    ('{"body": "no text key"}', "missing key 'text'"),
    ('{"text": 42}', "key 'text' is int, not a string"),
    ('{"text": "   "}', "key 'text' is an empty document"),
    ('["a list"]', "expected a JSON object"),
])
def test_bad_line_stops_with_location_and_leaves_no_output(tmp_path, spm, line, reason):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps({"text": "fine"}) + "\n" + line + "\n")
    with pytest.raises(BadInputError, match=f"{src}:2: {reason}"):
        run([str(src)], tmp_path / "out", spm, workers=2)
    assert os.listdir(tmp_path) == ["bad.jsonl"]  # neither final nor temporary files remain


def test_invalid_utf8_and_skip_bad_lines(tmp_path, spm):
    src = tmp_path / "mixed.jsonl"
    with open(src, "wb") as f:
        f.write(json.dumps({"text": "first"}).encode() + b"\n")
        f.write(b'{"text": "\xff\xfe broken"}\n')
        f.write(b"not json\n\n")
        f.write(json.dumps({"text": "last"}).encode() + b"\n")
    with pytest.raises(BadInputError, match=f"{src}:2: invalid UTF-8"):
        run([str(src)], tmp_path / "out", spm)
    stats = run([str(src)], tmp_path / "out", spm, skip_bad_lines=True)
    assert stats.documents == 2 and stats.skipped == 2
    assert stats.skipped_examples[0].startswith(f"{src}:2:") and stats.skipped_examples[1].startswith(f"{src}:3:")
    assert len(IndexedDataset(str(tmp_path / "out_text_document"))) == 2


def test_missing_input(tmp_path, spm):
    with pytest.raises(FileNotFoundError, match="--input: .*nothing-\\*.jsonl matches no file"):
        run([str(tmp_path / "nothing-*.jsonl")], tmp_path / "out", spm)


def test_interrupted_run_keeps_previous_output(tmp_path, spm, monkeypatch):
    src = write_jsonl(tmp_path / "a.jsonl", DOCS)
    run([src], tmp_path / "out", spm)
    before = open(tmp_path / "out_text_document.bin", "rb").read()
    import megatron_rpt.data.indexed as indexed
    monkeypatch.setattr(indexed.IndexedWriter, "add_batch",
                        lambda self, *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        run([write_jsonl(tmp_path / "b.jsonl", DOCS[:5])], tmp_path / "out", spm)
    assert open(tmp_path / "out_text_document.bin", "rb").read() == before
    assert not list(tmp_path.glob("*.tmp"))


def test_null_tokenizer_large_vocab_uses_int32_and_bad_ids_are_located(tmp_path):
    src = write_jsonl(tmp_path / "ids.jsonl", ["1 70000 3", "99999"])
    preprocess([src], str(tmp_path / "big"), tokenizer_type="NullTokenizer", vocab_size=100_000,
               append_eod=True, progress=False)
    ds = IndexedDataset(str(tmp_path / "big_text_document"))
    assert ds.index.dtype == np.int32 and [ds[0].tolist(), ds[1].tolist()] == [[1, 70000, 3, 100000], [99999, 100000]]
    bad = write_jsonl(tmp_path / "bad.jsonl", ["1 2", "1 two"])
    with pytest.raises(BadInputError, match=f"{bad}:2: key 'text' cannot be tokenized"):
        preprocess([bad], str(tmp_path / "x"), tokenizer_type="NullTokenizer", vocab_size=10, workers=2,
                   progress=False)
    assert not list(tmp_path.glob("x_*"))


def test_several_json_keys_and_no_documents(tmp_path, spm):
    src = tmp_path / "k.jsonl"
    src.write_text("".join(json.dumps({"text": d, "title": f"T{i}"}) + "\n" for i, d in enumerate(DOCS[:20])))
    run([str(src)], tmp_path / "multi", spm, json_keys=("text", "title"), append_eod=False)
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=spm)
    titles = IndexedDataset(str(tmp_path / "multi_title_document"))
    assert [titles[i].tolist() for i in range(20)] == [tok.tokenize(f"T{i}") for i in range(20)]
    assert len(IndexedDataset(str(tmp_path / "multi_text_document"))) == 20
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(BadInputError, match="no documents"):
        run([str(empty)], tmp_path / "none", spm)
    assert not list(tmp_path.glob("none*"))


def test_log_interval_lines(tmp_path, spm, capsys):
    src = write_jsonl(tmp_path / "a.jsonl", DOCS)
    run([src], tmp_path / "out", spm, log_interval=100, chunk_bytes=1000)  # ~5 documents per chunk
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("processed")]
    counts = [int(l.split()[1]) for l in lines]
    # One line per multiple of 100 crossed, with the true count at the chunk where it was crossed.
    assert [c // 100 for c in counts] == [1, 2, 3] and counts[-1] == 300 and all(c % 100 < 20 for c in counts)
    assert all("docs/s" in l and "MB/s" in l for l in lines)
