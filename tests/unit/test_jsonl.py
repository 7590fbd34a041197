"""The one jsonl reader (data/jsonl.py): --input expansion, .gz, bad lines named by file:line, and
the same reasons from every tool that reads a corpus (preprocessing, tokenizer training, RPT tasks)."""

import gzip
import json

import pytest

from megatron_rpt.data.jsonl import BadInputError, expand_inputs, iter_records, iter_texts

BAD_LINES = [
    ('{"text": "ok"', "malformed JSON"),
    ('{"body": "no text key"}', "missing key 'text'"),
    ('{"text": 42}', "key 'text' is int, not a string"),
    ('{"text": "  \\n "}', "key 'text' is an empty document"),
    ('["a list"]', "expected a JSON object, got list"),
]


def test_iter_texts_jsonl_and_plain(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one", "t": "x"}\n\n{"text": "two", "t": "y"}\n')
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write('{"text": "three", "t": "z"}\n')
    (tmp_path / "c.txt").write_text("plain 1\nplain 2\n")
    files = [str(tmp_path / n) for n in ("a.jsonl", "b.jsonl.gz", "c.txt")]
    assert list(iter_texts(files)) == ["one", "two", "three", "plain 1\n", "plain 2\n"]
    assert list(iter_texts(files[:1], ["text", "t"])) == ["one", "x", "two", "y"]
    with pytest.raises(ValueError, match=r"a.jsonl:1: missing key 'body'"):
        list(iter_texts(files[:1], ["body"]))


@pytest.mark.parametrize("line,reason", BAD_LINES)
def test_bad_line_is_one_error_naming_file_and_line(tmp_path, line, reason):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "fine"}\n\n' + line + "\n" + '{"text": "never read"}\n')
    with pytest.raises(BadInputError, match=f"^{src}:3: {reason}"):
        list(iter_records([str(src)]))
    # The same reason, same line, from tokenizer training's reader.
    with pytest.raises(BadInputError, match=f"^{src}:3: {reason}"):
        list(iter_texts([str(src)]))


def test_invalid_utf8_is_named_in_jsonl_and_plain_text(tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_bytes(b'{"text": "ok"}\n{"text": "\xff broken"}\n')
    with pytest.raises(BadInputError, match=f"^{src}:2: invalid UTF-8 at byte 10"):
        list(iter_records([str(src)]))
    txt = tmp_path / "a.txt"
    txt.write_bytes(b"fine\n\xfe\n")
    with pytest.raises(BadInputError, match=f"^{txt}:2: invalid UTF-8 at byte 0"):
        list(iter_texts([str(txt)]))


def test_records_lines_crlf_and_what_json_accepts(tmp_path):
    src = tmp_path / "a.jsonl"
    # CRLF endings, blank lines counted, NaN and a 70-bit integer (orjson rejects both, json accepts).
    src.write_bytes(b'{"text": "a"}\r\n\r\n  \n{"text": "b", "x": NaN, "n": 1180591620717411303424}\n')
    records = list(iter_records([str(src)]))
    assert [(r.line, r.texts, r.where) for r in records] == [(1, ["a"], f"{src}:1"), (4, ["b"], f"{src}:4")]
    assert records[1].obj["n"] == 2 ** 70


def test_gzip_and_corrupt_gzip(tmp_path):
    good = tmp_path / "a.jsonl.gz"
    with gzip.open(good, "wt") as f:
        f.write("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(2000)))
    assert [r.texts[0] for r in iter_records([str(good)])] == [f"doc {i}" for i in range(2000)]
    data = good.read_bytes()
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(BadInputError, match=f"^{cut}: not a complete gzip file"):
        list(iter_records([str(cut)]))
    fake = tmp_path / "fake.jsonl.gz"
    fake.write_text('{"text": "not compressed"}\n')
    with pytest.raises(BadInputError, match=f"^{fake}: not a complete gzip file"):
        list(iter_texts([str(fake)]))


def test_expand_inputs(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "c.txt"):
        (tmp_path / name).write_text('{"text": "x"}\n')
    (tmp_path / "d.jsonl").mkdir()
    a, b, c = (str(tmp_path / n) for n in ("a.jsonl", "b.jsonl", "c.txt"))
    assert expand_inputs([str(tmp_path / "[ab].jsonl"), c]) == [a, b, c]   # each glob sorted, then in order
    with pytest.raises(FileNotFoundError, match=r"--input: .*nothing-\*.jsonl matches no file \(no such file matches"):
        expand_inputs([a, str(tmp_path / "nothing-*.jsonl")])
    with pytest.raises(FileNotFoundError, match=r"--input: .*missing.jsonl matches no file \(no such file\)"):
        expand_inputs([str(tmp_path / "missing.jsonl")])
    with pytest.raises(FileNotFoundError, match=r"d.jsonl \(matched by .*\*.jsonl\) is not a file"):
        expand_inputs([str(tmp_path / "*.jsonl")])
    with pytest.raises(FileNotFoundError, match=r"d.jsonl is not a file"):
        expand_inputs([str(tmp_path / "d.jsonl")])
    with pytest.raises(BadInputError, match=r"a.jsonl is named twice \(by .*\[ab\].jsonl and .*a.jsonl\)"):
        expand_inputs([str(tmp_path / "[ab].jsonl"), a])


@pytest.mark.parametrize("line,reason", BAD_LINES[1:3])
def test_every_reader_gives_the_same_error(tmp_path, line, reason):
    """Preprocessing (its workers' chunks) and RPT task building read a bad line as tokenizer training does."""
    from megatron_rpt.data.preprocess import preprocess
    from megatron_rpt.rpt.tasks import iter_documents
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "1 2"}\n' + line + "\n")
    expected = f"{src}:2: {reason}"
    with pytest.raises(BadInputError) as e:
        preprocess([str(src)], str(tmp_path / "out"), tokenizer_type="NullTokenizer", vocab_size=8, progress=False)
    assert str(e.value).startswith(expected)
    with pytest.raises(BadInputError, match=f"^{expected}$"):
        list(iter_documents([str(src)]))
    with pytest.raises(BadInputError, match=f"^{expected}$"):
        list(iter_texts([str(src)]))
