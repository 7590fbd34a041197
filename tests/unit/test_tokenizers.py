"""Tokenizers: every --tokenizer-type against its reference library, special tokens, bad input."""

import json

import pytest

from megatron_rpt.data.tokenizers import TokenizerError, build_tokenizer
from megatron_rpt.data.tokenizers.training import train_byte_level_bpe, train_sentencepiece
from tests.assets import cl100k_path, gpt2_files

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
    from megatron_rpt.data.tokenizers.training import sample_lines
    lines = [f"line {i}" for i in range(10_000)]
    a, b = sample_lines(iter(lines), 500, seed=0), sample_lines(iter(lines), 500, seed=0)
    assert a == b and len(a) == 500 and len(set(a)) == 500
    idx = [int(x.split()[1]) for x in a]
    assert idx == sorted(idx)  # input order kept
    assert 2 * 500 // 10 < sum(i >= 5000 for i in idx) < 8 * 500 // 10  # both halves represented
    assert sample_lines(iter(lines), 500, seed=1) != a
    assert sample_lines(iter(lines[:7]), 500) == lines[:7]


def test_long_lines_are_cut_not_dropped():
    from megatron_rpt.data.tokenizers.training import _training_lines
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


# ---------------------------------------------------------------- GPT-2 files on tiktoken

def _gpt2_package_files():
    from pathlib import Path
    return tuple(Path(f) for f in gpt2_files())


ADVERSARIAL = ["", " ", "   \n\n\t ", "<|endoftext|>", "a<|endoftext|>b", "don't I'LL we've 'S", "1234567890" * 5,
               "\u00a0\u2003\u3000 odd spaces", "e\u0301 combining", "🙂🙂🙂 zwj 👩‍👩‍👧", "\r\n\r\n", "trailing   ",
               "x" * 3000, "混合 text 漢字 ελληνικά кириллица العربية"]


def test_gpt2_files_run_on_tiktoken_with_the_reference_ids():
    from tokenizers import ByteLevelBPETokenizer
    vocab, merges = _gpt2_package_files()
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=str(vocab), merge_file=str(merges))
    ref = ByteLevelBPETokenizer(str(vocab), str(merges))
    assert tok._fast is not None and (tok.vocab_size, tok.eod) == (50257, 50256)
    texts = [TEXT] + SAMPLES + ADVERSARIAL
    assert tok.tokenize_batch(texts) == [ref.encode(t).ids for t in texts]
    assert [tok.tokenize(t) for t in texts] == [ref.encode(t).ids for t in texts]
    assert tok.tokenize("<|endoftext|>") != [tok.eod]  # text, as in Megatron-LM's GPT2BPETokenizer


def test_trained_byte_level_bpe_also_runs_on_tiktoken(tmp_path):
    from tokenizers import ByteLevelBPETokenizer
    folder = train_byte_level_bpe([TEXT * 20] + SAMPLES, str(tmp_path / "bpe"), vocab_size=400)
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=str(folder / "vocab.json"),
                          merge_file=str(folder / "merges.txt"))
    ref = ByteLevelBPETokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    assert tok._fast is not None
    texts = [TEXT] + SAMPLES + ADVERSARIAL
    assert tok.tokenize_batch(texts) == [ref.encode(t).ids for t in texts]


def test_gpt2_files_tiktoken_would_disagree_with_fall_back(tmp_path):
    # Swap two merge lines: merge order no longer follows ids, so tiktoken's rank order would
    # differ from BPE's; the tokenizer must keep the reference (Hugging Face) path.
    from tokenizers import ByteLevelBPETokenizer
    _, vocab, merges = _gpt2_files(tmp_path)
    lines = merges.read_text(encoding="utf-8").splitlines()
    lines[5], lines[40] = lines[40], lines[5]
    merges.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=str(vocab), merge_file=str(merges))
    ref = ByteLevelBPETokenizer(str(vocab), str(merges))
    assert tok._fast is None
    assert tok.tokenize_batch([TEXT] + SAMPLES) == [ref.encode(t).ids for t in [TEXT] + SAMPLES]


# ---------------------------------------------------------------- TikTokenizer (Megatron-LM's)

def _megatron_json_vocab(tmp_path):
    """cl100k's tokens in Megatron-LM's tiktoken JSON layout (the 256 bytes first, in byte order)."""
    import base64
    from tiktoken.load import load_tiktoken_bpe
    ranks = load_tiktoken_bpe(cl100k_path())
    tokens = [bytes([i]) for i in range(256)] + [t for t, _ in sorted(ranks.items(), key=lambda x: x[1]) if len(t) > 1]
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps([{"rank": i, "token_bytes": base64.b64encode(t).decode(), "token_str": ""}
                                for i, t in enumerate(tokens)]))
    return path, len(tokens)


@pytest.mark.parametrize("pattern", ["v1", "v2"])
def test_tiktokenizer_ids_equal_megatron_core(tmp_path, pattern):
    from megatron_rpt.platform.messages import quiet_megatron_core_backend_warnings
    quiet_megatron_core_backend_warnings()
    from megatron.core.tokenizers.text.libraries.tiktoken_tokenizer import TikTokenTokenizer
    path, n = _megatron_json_vocab(tmp_path)
    ref = TikTokenTokenizer(str(path), pattern=pattern, vocab_size=1000 + 30000)
    tok = build_tokenizer("TikTokenizer", tokenizer_model=str(path), tiktoken_pattern=pattern, vocab_size=31000)
    assert (tok.vocab_size, tok.eod, tok.bos, tok.pad) == (31000, ref.eos_id, ref.bos_id, ref.pad_id) == (31000, 2, 1, 4)
    for text in [TEXT] + SAMPLES + ADVERSARIAL + ["a </s> b <s>"]:
        assert tok.tokenize(text) == ref.text_to_ids(text), text
        assert max(tok.tokenize(text) or [0]) < 31000
    assert tok.detokenize(tok.tokenize(TEXT)) == TEXT
    full = build_tokenizer("TikTokenizer", tokenizer_model=str(path))
    assert full.vocab_size == 1000 + n


def test_tiktokenizer_reads_tiktoken_rank_files():
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    path = cl100k_path()
    tok = build_tokenizer("TikTokenizer", tokenizer_model=path, tiktoken_num_special_tokens=10)
    ranks = load_tiktoken_bpe(path)
    ref = tiktoken.Encoding("ref", pat_str=tok._enc._pat_str, mergeable_ranks=ranks, special_tokens={})
    for text in [TEXT] + SAMPLES + ADVERSARIAL:
        assert tok.tokenize(text) == [i + 10 for i in ref.encode_ordinary(text)]
    assert tok.vocab_size == 10 + len(ranks)


@pytest.mark.parametrize("kwargs,msg", [
    (dict(tiktoken_pattern="v3"), "--tiktoken-pattern"),
    (dict(tiktoken_num_special_tokens=3), "--tiktoken-num-special-tokens 3 < 7"),
    (dict(tiktoken_special_tokens=["<s>", "</s>"]), "must be unique and include"),
    (dict(vocab_size=1100), "--vocab-size 1100"),
])
def test_tiktokenizer_bad_flags(kwargs, msg):
    with pytest.raises(TokenizerError, match=msg):
        build_tokenizer("TikTokenizer", tokenizer_model=cl100k_path(), **kwargs)


def test_tiktokenizer_bad_files(tmp_path):
    bad = tmp_path / "bad.tiktoken"
    bad.write_bytes(b"QQ== 0\nnot-a-line\n")
    with pytest.raises(TokenizerError, match=f"{bad}:2: not a 'base64 rank' line"):
        build_tokenizer("TikTokenizer", tokenizer_model=str(bad))
    gap = tmp_path / "gap.json"
    gap.write_text(json.dumps([{"rank": 1, "token_bytes": "QQ==", "token_str": "A"}]))
    with pytest.raises(TokenizerError, match="entry 0 is not"):
        build_tokenizer("TikTokenizer", tokenizer_model=str(gap))
    with pytest.raises(TokenizerError, match="TikTokenizer needs --tokenizer-model"):
        build_tokenizer("TikTokenizer")


# ---------------------------------------------------------------- HuggingFaceTokenizer on tiktoken

def _prose(tmp_path_factory):
    """Real prose when this pytest session built the demo corpus (tests/e2e/test_data_tools.py, run
    earlier in the suite), else the module's samples; never another session's files."""
    texts = [TEXT] + SAMPLES + ADVERSARIAL
    path = tmp_path_factory.getbasetemp() / "demo_corpus_cache" / "demo_corpus.jsonl"
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            texts += [json.loads(line)["text"] for _, line in zip(range(300), f)]
    return texts


def _hf_folder(tmp_path, backend, **special):
    from transformers import PreTrainedTokenizerFast
    folder = tmp_path / "hf"
    PreTrainedTokenizerFast(tokenizer_object=backend, **special).save_pretrained(str(folder))
    return folder


def test_hf_gpt2_llama3_style_and_trained_folders_run_on_tiktoken_with_the_reference_ids(tmp_path, tmp_path_factory):
    from tokenizers import Regex, Tokenizer as RawTokenizer, pre_tokenizers
    from tokenizers.models import BPE
    vocab, merges = _gpt2_package_files()
    gpt2 = RawTokenizer(BPE.from_file(str(vocab), str(merges)))
    gpt2.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    gpt2.add_special_tokens(["<|endoftext|>"])
    # Llama-3 / Qwen layout: a Split regex (cl100k's style) then ByteLevel without its own regex.
    llama = RawTokenizer(BPE.from_file(str(vocab), str(merges)))
    llama.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
                                   r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    llama.add_special_tokens(["<|endoftext|>", "<|im_start|>"])
    trained = train_byte_level_bpe([TEXT * 20] + SAMPLES, str(tmp_path / "trained"), vocab_size=400)
    folders = {"gpt2": _hf_folder(tmp_path / "a", gpt2, eos_token="<|endoftext|>"),
               "llama3-style": _hf_folder(tmp_path / "b", llama, eos_token="<|endoftext|>"),
               "trained": trained}
    texts = _prose(tmp_path_factory) + ["<|im_start|>user\nhi<|endoftext|>", "x<|endoftext|>y"]
    for name, folder in folders.items():
        tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(folder))
        ref = RawTokenizer.from_file(str(folder / "tokenizer.json"))
        assert tok._fast is not None, name
        assert tok.tokenize_batch(texts) == [e.ids for e in ref.encode_batch(texts, add_special_tokens=False)], name
        assert tok.tokenize("a<|endoftext|>") == ref.encode("a<|endoftext|>", add_special_tokens=False).ids
        assert tok.tokenize("a<|endoftext|>")[-1] == tok.eod  # added tokens in text: the special id, as HF


def test_hf_tokenizer_tiktoken_cannot_reproduce_keeps_the_reference(tmp_path):
    from tokenizers import Tokenizer as RawTokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    vocab, merges = _gpt2_package_files()
    tok = RawTokenizer(BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.normalizer = normalizers.NFKC()  # tiktoken has no normalizer
    tok.add_special_tokens(["<|endoftext|>"])
    folder = _hf_folder(tmp_path, tok, eos_token="<|endoftext|>")
    ours = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(folder))
    assert ours._fast is None
    texts = [TEXT] + SAMPLES + ["ﬁ ligature Ⅻ ①"]
    assert ours.tokenize_batch(texts) == [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]


def test_every_flag_choice_is_built():
    """config.schema.TOKENIZER_TYPES (the --tokenizer-type choices) and the factory agree: each name
    reaches its builder (which asks for its files), none is 'unknown'."""
    from megatron_rpt.config.schema import TOKENIZER_TYPES
    for name in TOKENIZER_TYPES:
        with pytest.raises(TokenizerError) as e:
            build_tokenizer(name)
        assert str(e.value).startswith(f"{name} needs --"), e.value   # its builder, asking for its files
    with pytest.raises(TokenizerError, match="unknown 'Nope'"):
        build_tokenizer("Nope")


def test_mock_data_with_every_tokenizer_type(tmp_path, spm_model):
    """--mock-data builds its samples with the run's tokenizer whatever its type (Megatron-Core's mock
    dataset: ids 1.. modulo the tokenizer's vocabulary, then its end-of-document id), and the run's
    flags for each type validate, as a Megatron-LM smoke-test script would give them."""
    from megatron_rpt.config import parse_args
    from megatron_rpt.data.datasets import build_datasets
    from megatron_rpt.data.tokenizers import tokenizer_from_config
    from megatron_rpt.validate import validate_config

    _, vocab, merges = _gpt2_files(tmp_path)
    bpe = train_byte_level_bpe([TEXT * 20], str(tmp_path / "bpe"), vocab_size=300)
    files = {"SentencePieceTokenizer": ["--tokenizer-model", str(spm_model)],
             "Llama2Tokenizer": ["--tokenizer-model", str(spm_model)],
             "HuggingFaceTokenizer": ["--tokenizer-model", str(bpe)],
             "GPT2BPETokenizer": ["--vocab-file", str(vocab), "--merge-file", str(merges)],
             "TikTokenizer": ["--tokenizer-model", cl100k_path()],
             "NullTokenizer": ["--vocab-size", "1000"]}
    from megatron_rpt.config.schema import TOKENIZER_TYPES
    assert set(files) == set(TOKENIZER_TYPES)
    base = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
            "--lr", "1e-3", "--train-iters", "2", "--eval-iters", "1", "--eval-interval", "2", "--mock-data"]
    for name, flags in files.items():
        cfg = validate_config(parse_args(base + ["--tokenizer-type", name] + flags), 1)
        tok = tokenizer_from_config(cfg)
        data = build_datasets(cfg, tok)
        assert data.train is not None and data.valid is not None, name
        for i in range(4):
            sample = data.train[i]
            ids = sample["tokens"].tolist() + [int(sample["labels"][-1])]
            assert max(ids) < tok.vocab_size and min(ids) >= 0, (name, tok.vocab_size)
            # documents 1, 2, ... (mod the vocabulary), each closed by the tokenizer's end-of-document id
            for a, b in zip(ids, ids[1:]):
                assert b == tok.eod or b == (a + 1) % tok.vocab_size or (a == tok.eod and b == 1), (name, a, b)


def test_llama2_tokenizer_is_the_model_with_eos_as_end_of_document(tmp_path):
    """Llama2Tokenizer (Megatron-LM's name for Llama-2 / Mixtral tokenizer.model): sentencepiece's ids as
    they are (no BOS added) and </s> closing documents, where SentencePieceTokenizer prefers <eod>."""
    import io

    import sentencepiece as spm
    buf = io.BytesIO()   # a Llama-style model (<s>, </s>) that also has an <eod> piece
    spm.SentencePieceTrainer.train(sentence_iterator=iter((TEXT * 20).splitlines()), model_writer=buf,
                                   vocab_size=50, user_defined_symbols=["<eod>"], minloglevel=2)
    model = tmp_path / "tokenizer.model"
    model.write_bytes(buf.getvalue())
    ref = spm.SentencePieceProcessor(model_file=str(model))
    llama = build_tokenizer("Llama2Tokenizer", tokenizer_model=str(model))
    plain = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(model))
    assert ref.id_to_piece(ref.eos_id()) == "</s>" and llama.eod == ref.eos_id()
    assert plain.eod == ref.piece_to_id("<eod>") != llama.eod
    assert llama.vocab_size == plain.vocab_size == ref.get_piece_size()
    for text in [TEXT] + SAMPLES:
        assert llama.tokenize(text) == plain.tokenize(text) == ref.encode(text)
    with pytest.raises(TokenizerError, match="Llama2Tokenizer needs --tokenizer-model"):
        build_tokenizer("Llama2Tokenizer")
