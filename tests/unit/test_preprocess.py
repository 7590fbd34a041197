"""preprocess_data: ids in .bin/.idx equal the tokenizer's, worker-count invariance, bad input, atomic output."""

import gzip
import json
import os

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_rpt.data.jsonl import BadInputError
from megatron_rpt.data.preprocess import preprocess
from megatron_rpt.data.tokenizers import build_tokenizer
from megatron_rpt.data.tokenizers.training import train_sentencepiece

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


# ---------------------------------------------------------------- the writer and merging

def _random_documents(rng, n, vocab):
    docs = []
    for _ in range(n):
        sentences = [rng.integers(0, vocab, size=int(rng.integers(1, 30))).tolist() for _ in range(int(rng.integers(1, 4)))]
        docs.append(sentences)
    return docs


@pytest.mark.parametrize("vocab", [500, 100_000])
def test_writer_bytes_equal_megatron_core_builder(tmp_path, vocab):
    """Our streaming writer produces exactly the files of Megatron-Core's IndexedDatasetBuilder."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from megatron_rpt.data.indexed import IndexedWriter, token_dtype
    docs = _random_documents(np.random.default_rng(0), 200, vocab)
    ref = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=token_dtype(vocab))
    for doc in docs:
        ref.add_document(np.array([t for s in doc for t in s]), [len(s) for s in doc])
    ref.finalize(str(tmp_path / "ref.idx"))
    ours = IndexedWriter(str(tmp_path / "ours"), vocab)
    for doc in docs[:50]:  # one at a time, then in batches
        ours.add_document([t for s in doc for t in s], [len(s) for s in doc])
    for start in range(50, 200, 37):
        batch = docs[start:start + 37]
        ours.add_batch(np.array([t for d in batch for s in d for t in s]), np.array([len(s) for d in batch for s in d]),
                       np.array([len(d) for d in batch]))
    ours.finalize()
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()
    assert not list(tmp_path.glob("*.tmp"))


def test_writer_rejects_inconsistent_batches_and_out_of_range_ids(tmp_path):
    from megatron_rpt.data.indexed import IndexedWriter
    w = IndexedWriter(str(tmp_path / "x"), 500)
    with pytest.raises(ValueError, match="inconsistent batch"):
        w.add_batch(np.arange(5), np.array([2, 2]), np.array([2]))
    with pytest.raises(ValueError, match="token id 70000 outside the uint16 range"):
        w.add_batch(np.array([1, 70000]), np.array([2]), np.array([1]))
    with pytest.raises(ValueError, match="token id -1 outside the uint16 range"):
        w.add_batch(np.array([1, -1]), np.array([2]), np.array([1]))
    wide = IndexedWriter(str(tmp_path / "wide"), 100_000)
    with pytest.raises(ValueError, match="token id -3 outside the int32 range"):
        wide.add_document([5, -3])
    wide.abort()
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_merge_equals_preprocessing_the_concatenation(tmp_path, spm):
    from megatron_rpt.data.indexed import merge_datasets
    parts = [DOCS[:120], DOCS[120:121], DOCS[121:]]
    for i, docs in enumerate(parts):
        run([write_jsonl(tmp_path / f"p{i}.jsonl", docs)], tmp_path / f"p{i}", spm)
    run([write_jsonl(tmp_path / "all.jsonl", DOCS)], tmp_path / "all", spm)
    writer = merge_datasets([str(tmp_path / f"p{i}_text_document") for i in range(3)], str(tmp_path / "merged"))
    assert writer.documents == len(DOCS)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"merged{ext}").read_bytes() == (tmp_path / f"all_text_document{ext}").read_bytes()


def test_merge_errors(tmp_path, spm):
    from megatron_rpt.data.indexed import merge_datasets
    a = str(tmp_path / "a_text_document")
    run([write_jsonl(tmp_path / "a.jsonl", DOCS[:10])], tmp_path / "a", spm)
    preprocess([write_jsonl(tmp_path / "ids.jsonl", ["1 2 3"])], str(tmp_path / "wide"), tokenizer_type="NullTokenizer",
               vocab_size=100_000, progress=False)
    with pytest.raises(ValueError, match="token dtype int32 differs from uint16"):
        merge_datasets([a, str(tmp_path / "wide_text_document")], str(tmp_path / "m"))
    with pytest.raises(FileNotFoundError, match="nope.idx not found|nope.bin not found"):
        merge_datasets([a, str(tmp_path / "nope")], str(tmp_path / "m"))
    with pytest.raises(ValueError, match="is also an input"):
        merge_datasets([a], a)
    garbage = tmp_path / "g"
    (tmp_path / "g.bin").write_bytes(b"\0" * 8)
    (tmp_path / "g.idx").write_bytes(b"not an index at all")
    with pytest.raises(ValueError, match="merge input 2: .*g.idx is not a readable Megatron index"):
        merge_datasets([a, str(garbage)], str(tmp_path / "m"))
    trunc = tmp_path / "t_text_document"
    run([write_jsonl(tmp_path / "t.jsonl", DOCS[:10])], tmp_path / "t", spm)
    data = (tmp_path / "t_text_document.bin").read_bytes()
    (tmp_path / "t_text_document.bin").write_bytes(data[:-2])
    with pytest.raises(ValueError, match="merge input 2: .*t_text_document.bin has .* bytes but .*t_text_document.idx "
                                         "describes .*: the .bin is truncated"):
        merge_datasets([a, str(trunc)], str(tmp_path / "m"))
    assert not list(tmp_path.glob("m.*")) and not list(tmp_path.glob("*.tmp"))


def _worker_dies(data):
    os._exit(3)   # as the OOM killer would end a worker: no exception, no result


def test_a_dying_worker_is_an_error_not_a_hang(tmp_path, spm, monkeypatch):
    import megatron_rpt.data.preprocess as pre
    src = write_jsonl(tmp_path / "a.jsonl", DOCS)
    monkeypatch.setattr(pre, "encode_chunk", _worker_dies)
    with pytest.raises(RuntimeError, match=f"a --workers process died while tokenizing {src}"):
        run([src], tmp_path / "out", spm, workers=2, partitions=2, chunk_bytes=3000)
    assert not list(tmp_path.glob("out*"))


# ---------------------------------------------------------------- partitions, sentences, JSON corner cases

def test_partitions_give_identical_output_and_true_line_numbers(tmp_path, spm):
    first = write_jsonl(tmp_path / "a.jsonl", DOCS[:200])
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": d}) + "\n" for d in DOCS[200:]))
    inputs = [first, str(tmp_path / "b.jsonl.gz")]
    run(inputs, tmp_path / "one", spm)
    for workers, partitions in [(1, 4), (2, 3), (2, 7)]:
        run(inputs, tmp_path / f"p{partitions}", spm, workers=workers, partitions=partitions, chunk_bytes=3000)
        for ext in (".bin", ".idx"):
            assert (tmp_path / f"p{partitions}_text_document{ext}").read_bytes() == \
                (tmp_path / f"one_text_document{ext}").read_bytes()
    assert not list(tmp_path.glob("*.part*")) and not list(tmp_path.glob("*.tmp"))
    # A bad line deep in the plain file is reported with its true line number from any partition.
    lines = open(first).read().splitlines(keepends=True)
    lines[170] = '{"text": 3}\n'
    open(first, "w").write("".join(lines))
    with pytest.raises(BadInputError, match=f"{first}:171: key 'text' is int"):
        run(inputs, tmp_path / "bad", spm, workers=2, partitions=4, chunk_bytes=3000)
    stats = run(inputs, tmp_path / "skip", spm, workers=2, partitions=4, chunk_bytes=3000, skip_bad_lines=True)
    assert stats.skipped == 1 and stats.skipped_examples == [f"{first}:171: key 'text' is int, not a string"]
    assert stats.documents == len(DOCS) - 1
    assert not list(tmp_path.glob("bad*"))


def test_plan_partitions_cuts_plain_files_at_line_starts(tmp_path):
    from megatron_rpt.data.preprocess import plan_partitions
    path = tmp_path / "x.jsonl"
    path.write_bytes(b"".join(b'{"text": "%s"}\n' % (b"y" * (i % 13)) for i in range(500)))
    data = path.read_bytes()
    for n in (1, 2, 5, 64):
        plan = plan_partitions([str(path)], n)
        segments = [s for part in plan for s in part]
        assert 1 <= len(plan) <= n and segments[0].start == 0 and segments[-1].end is None
        for s, nxt in zip(segments, segments[1:]):
            assert s.end == nxt.start and data[s.end - 1:s.end] == b"\n"
            assert nxt.first_line() == data[:nxt.start].count(b"\n") + 1
    with pytest.raises(ValueError, match="--partitions must be >= 1"):
        plan_partitions([str(path)], 0)


SENTENCE_DOC = "Dr. Smith went to Washington, D.C. on Jan. 5. He met the U.S. president.\n\nThen he left!  Did he?"


def test_split_sentences_handles_abbreviations_and_puts_eod_on_the_last(tmp_path, spm):
    src = write_jsonl(tmp_path / "s.jsonl", [SENTENCE_DOC, "One sentence only"])
    stats = run([src], tmp_path / "out", spm, split_sentences=True)
    assert stats.outputs["text"][0].endswith("out_text_sentence.bin")
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=spm)
    expected = ["Dr. Smith went to Washington, D.C. on Jan. 5.", "He met the U.S. president.", "Then he left!",
                "Did he?"]
    ds = IndexedDataset(str(tmp_path / "out_text_sentence"))
    assert ds.index.document_indices.tolist() == [0, 4, 5]
    seqs = [ds[i].tolist() for i in range(len(ds))]
    assert seqs[:4] == [tok.tokenize(s) for s in expected[:3]] + [tok.tokenize(expected[3]) + [tok.eod]]
    assert seqs[4] == tok.tokenize("One sentence only") + [tok.eod]


def test_keep_newlines_keeps_the_whitespace_after_each_sentence(tmp_path, spm):
    src = write_jsonl(tmp_path / "s.jsonl", [SENTENCE_DOC])
    run([src], tmp_path / "out", spm, split_sentences=True, keep_newlines=True, append_eod=False)
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=spm)
    pieces = ["Dr. Smith went to Washington, D.C. on Jan. 5. ", "He met the U.S. president.\n\n", "Then he left!  ",
              "Did he?"]
    assert "".join(pieces) == SENTENCE_DOC
    ds = IndexedDataset(str(tmp_path / "out_text_sentence"))
    assert [ds[i].tolist() for i in range(len(ds))] == [tok.tokenize(p) for p in pieces]
    with pytest.raises(ValueError, match="--lang: no Punkt model for 'klingon'"):
        run([src], tmp_path / "x", spm, split_sentences=True, lang="klingon")


def test_json_that_only_the_standard_library_accepts_is_accepted(tmp_path, spm):
    src = tmp_path / "odd.jsonl"
    src.write_text('{"text": "nan value", "x": NaN}\n{"text": "big int", "x": 123456789012345678901234567890}\r\n')
    run([str(src)], tmp_path / "out", spm, append_eod=False)
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=spm)
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    assert [ds[0].tolist(), ds[1].tolist()] == [tok.tokenize("nan value"), tok.tokenize("big int")]


def test_last_line_without_newline_and_huge_line_larger_than_a_chunk(tmp_path, spm):
    src = tmp_path / "x.jsonl"
    long_doc = "word " * 5000
    src.write_text(json.dumps({"text": "first"}) + "\n" + json.dumps({"text": long_doc}) + "\n" +
                   json.dumps({"text": "no newline at the end"}))
    run([str(src)], tmp_path / "out", spm, chunk_bytes=100, workers=2)
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=spm)
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    assert [ds[i].tolist() for i in range(3)] == [tok.tokenize(t) + [tok.eod] for t in
                                                  ("first", long_doc, "no newline at the end")]
