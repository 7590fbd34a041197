"""Tokenizers: every --tokenizer-type against its reference library, special tokens, bad input."""

import json

import pytest

from megatron_rpt.data.tokenizers import TokenizerError, build_tokenizer, train_byte_level_bpe, train_sentencepiece

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife.\nCall me Ishmael. Some years ago--never mind how long precisely--\n")
SAMPLES = ["Hello  world,\n  \"quoted\" 1234 — café ☃ 漢字", "  leading and trailing  ", "tab\tseparated\r\n"]


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("spm") / "tok"
    return train_sentencepiece([TEXT * 20], str(prefix), vocab_size=300)


def test_sentencepiece_specials_and_round_trip(spm_model):
    import sentencepiece as spm
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(spm_model))
    ref = spm.SentencePieceProcessor(model_file=str(spm_model))
    assert (tok.pad, tok.eod, tok.bos, tok.vocab_size) == (0, 3, 2, 300)
    assert ref.id_to_piece(tok.eod) == "<eod>" and ref.is_control(tok.eod) and ref.is_control(tok.pad)
    for text in [TEXT] + SAMPLES:
        ids = tok.tokenize(text)
        assert ids == ref.encode(text)
        assert tok.eod not in ids and tok.pad not in ids
        assert tok.detokenize(ids) == text   # byte fallback + identity normalisation: lossless
    assert tok.unique_identifiers["model"] == str(spm_model.resolve())


def test_sentencepiece_unigram_and_bad_model_type(tmp_path):
    model = train_sentencepiece([TEXT * 20], str(tmp_path / "uni"), vocab_size=300, model_type="unigram")
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(model))
    assert tok.detokenize(tok.tokenize(TEXT)) == TEXT
    with pytest.raises(TokenizerError, match="bpe or unigram"):
        train_sentencepiece([TEXT], str(tmp_path / "x"), vocab_size=300, model_type="wordpiece")
    assert not list(tmp_path.glob("x*"))


def _gpt2_files(tmp_path):
    from tokenizers import ByteLevelBPETokenizer
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([TEXT * 10], vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False)
    bpe.save_model(str(tmp_path))
    return bpe, tmp_path / "vocab.json", tmp_path / "merges.txt"


def test_gpt2_bpe_matches_tokenizers_library(tmp_path):
    ref, vocab, merges = _gpt2_files(tmp_path)
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=str(vocab), merge_file=str(merges))
    assert tok.eod == json.load(open(vocab))["<|endoftext|>"]
    for text in [TEXT] + SAMPLES:
        assert tok.tokenize(text) == ref.encode(text).ids
        assert tok.detokenize(tok.tokenize(text)) == text


def test_huggingface_tokenizer_json_and_folder(tmp_path):
    ref, _, _ = _gpt2_files(tmp_path)
    path = tmp_path / "tokenizer.json"
    ref.save(str(path))
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(path))
    assert tok.eod == ref.token_to_id("<|endoftext|>") and tok.pad == -1
    assert tok.tokenize(TEXT) == ref.encode(TEXT).ids
    from transformers import PreTrainedTokenizerFast
    folder = tmp_path / "hf"
    PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<|endoftext|>",
                            pad_token="<|endoftext|>").save_pretrained(str(folder))
    tok2 = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(folder))
    assert tok2.tokenize(TEXT) == tok.tokenize(TEXT) and tok2.eod == tok.eod


def test_trained_byte_level_bpe_loads_as_gpt2_and_hf(tmp_path):
    from tokenizers import Tokenizer as RawTokenizer
    out = train_byte_level_bpe([TEXT * 20], str(tmp_path / "bpe"), vocab_size=300)
    first = {f.name: f.read_bytes() for f in out.iterdir()}
    gpt2 = build_tokenizer("GPT2BPETokenizer", vocab_file=str(out / "vocab.json"), merge_file=str(out / "merges.txt"))
    hf = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(out))
    ref = RawTokenizer.from_file(str(out / "tokenizer.json"))
    assert gpt2.eod == hf.eod == ref.token_to_id("<|endoftext|>") and hf.pad == ref.token_to_id("<|pad|>") != hf.eod
    for text in [TEXT] + SAMPLES:
        ids = gpt2.tokenize(text)
        assert ids == hf.tokenize(text) == ref.encode(text).ids and gpt2.eod not in ids
        assert gpt2.detokenize(ids) == text
    train_byte_level_bpe([TEXT * 20], str(out), vocab_size=300)  # rerun replaces it identically
    assert {f.name: f.read_bytes() for f in out.iterdir()} == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bpe"]


def test_null_tokenizer_is_megatron_convention():
    tok = build_tokenizer("NullTokenizer", vocab_size=100)
    assert (tok.vocab_size, tok.eod, tok.pad) == (101, 100, -1)
    assert tok.tokenize("3 1 4 1 5") == [3, 1, 4, 1, 5] and tok.detokenize([9, 2]) == "9 2"
    with pytest.raises(ValueError, match="id 101 outside"):
        tok.tokenize("1 101")


@pytest.mark.parametrize("kwargs,msg", [
    (dict(tokenizer_type="SentencePieceTokenizer"), "needs --tokenizer-model"),
    (dict(tokenizer_type="SentencePieceTokenizer", tokenizer_model="/nope/x.model"), "--tokenizer-model: /nope/x.model not found"),
    (dict(tokenizer_type="GPT2BPETokenizer", vocab_file="/nope/v.json"), "--vocab-file: /nope/v.json not found"),
    (dict(tokenizer_type="NullTokenizer"), "NullTokenizer needs --vocab-size"),
    (dict(tokenizer_type="Bert"), "unknown 'Bert'"),
])
def test_bad_tokenizer_flags(kwargs, msg):
    with pytest.raises(TokenizerError, match=msg):
        build_tokenizer(**kwargs)


def test_corrupt_sentencepiece_model(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="is not a sentencepiece model"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(bad))


def test_training_sample_is_uniform_bounded_and_deterministic():
    from megatron_rpt.data.tokenizers import sample_lines
    lines = [f"line {i}" for i in range(10_000)]
    a, b = sample_lines(iter(lines), 500, seed=0), sample_lines(iter(lines), 500, seed=0)
    assert a == b and len(a) == 500 and len(set(a)) == 500
    idx = [int(x.split()[1]) for x in a]
    assert idx == sorted(idx)  # input order kept
    assert 2 * 500 // 10 < sum(i >= 5000 for i in idx) < 8 * 500 // 10  # both halves represented
    assert sample_lines(iter(lines), 500, seed=1) != a
    assert sample_lines(iter(lines[:7]), 500) == lines[:7]


def test_long_lines_are_cut_not_dropped():
    from megatron_rpt.data.tokenizers import _training_lines
    para = " ".join(f"Sentence number {i} ends here." for i in range(400))  # ~11 KB, one line
    pieces = list(_training_lines([para + "\n\n" + "short\n" + "x" * 5000], max_chars=2000))
    assert all(0 < len(p) <= 2000 for p in pieces)
    assert " ".join(pieces[:-4]) == para and pieces[-4] == "short" and "".join(pieces[-3:]) == "x" * 5000


def test_training_is_deterministic_and_uses_long_paragraphs(tmp_path):
    para = " ".join(["Zyxwvut qrstuv."] * 600)  # longer than sentencepiece's default 4192-byte limit
    a = train_sentencepiece([TEXT * 20, para], str(tmp_path / "a"), vocab_size=300)
    b = train_sentencepiece([TEXT * 20, para], str(tmp_path / "a"), vocab_size=300)
    assert a.read_bytes() == b.read_bytes()
    import sentencepiece as spm
    ref = spm.SentencePieceProcessor(model_file=str(a))
    # "Z" occurs only in the long paragraph: a piece of its own, not byte fallback, so it was used.
    assert not any(ref.is_byte(i) for i in ref.encode("Zyxwvut"))
    assert any(ref.is_byte(i) for i in ref.encode("J"))  # control: a character never seen


def test_iter_texts_jsonl_and_plain(tmp_path):
    import gzip
    from megatron_rpt.data.tokenizers import iter_texts
    (tmp_path / "a.jsonl").write_text('{"text": "one", "t": "x"}\n\n{"text": "two", "t": "y"}\n')
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write('{"text": "three", "t": "z"}\n')
    (tmp_path / "c.txt").write_text("plain 1\nplain 2\n")
    files = [str(tmp_path / n) for n in ("a.jsonl", "b.jsonl.gz", "c.txt")]
    assert list(iter_texts(files)) == ["one", "two", "three", "plain 1\n", "plain 2\n"]
    assert list(iter_texts(files[:1], ["text", "t"])) == ["one", "x", "two", "y"]
    with pytest.raises(ValueError, match=r"a.jsonl:1: missing or non-string key 'body'"):
        list(iter_texts(files[:1], ["body"]))
