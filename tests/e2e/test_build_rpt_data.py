"""tools/build_rpt_data.py end to end on a tiny random Llama (transformers, save_pretrained) with a
byte-level BPE trained here: entropies equal a float64 computation from transformers' own logits,
the entropy/context/UTF-8 filter keeps exactly the right positions, records are consistent with
the tokenizer, held-out split by document, resume after SIGKILL is byte-identical, --batch-size
changes entropies by < 1e-5 only, a Megatron checkpoint of the same weights (tools/convert_checkpoint.py
import) gives the same entropies, and bad input is one clear error.

Every model computation runs in a subprocess (the tool, or a reference script), never in pytest.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")
SEQ, CTX, THRESHOLD, HELDOUT = 48, 8, 0.5, 4

MAKE = """
import sys, torch, transformers
from megatron_rpt.data.tokenizers import iter_texts, train_byte_level_bpe
out, corpus = sys.argv[1], sys.argv[2]
train_byte_level_bpe(list(iter_texts([corpus])), out, vocab_size=320)
tok = transformers.AutoTokenizer.from_pretrained(out)
config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, vocab_size=len(tok), max_position_embeddings=256, rms_norm_eps=1e-6,
    tie_word_embeddings=False, initializer_range=0.2)
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(config)
with torch.no_grad():
    model.lm_head.weight.mul_(3.0)   # spread the top-16 entropies over (0, log 16): every split populated
model.save_pretrained(out)
"""

# The reference: transformers' full logits (model(input_ids).logits), float64 top-16 entropy, windows
# by the documented rule (window k scores (end_{k-1}, end_k], starting CTX tokens before its first target).
REFERENCE = """
import json, math, sys, torch, transformers
folder, docs_path, seq, ctx = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
def entropy(row):
    top = sorted(row.double().tolist(), reverse=True)[:16]
    z = sum(math.exp(x - top[0]) for x in top)
    p = [math.exp(x - top[0]) / z for x in top]
    return -sum(q * math.log(q) for q in p)
out = {"windowed": {}, "prefix": {}}
docs = json.load(open(docs_path))
with torch.no_grad():
    for doc_id, ids in docs["ids"].items():
        n, res = len(ids), {}
        start, end = 0, min(seq, n - 1)
        while n - 1 >= ctx:
            logits = model(torch.tensor([ids[start:end]])).logits[0]
            first = start + ctx
            for t in range(first, end + 1):
                res[t] = entropy(logits[t - start - 1])
            if end >= n - 1:
                break
            start = end + 1 - ctx
            end = min(start + seq, n - 1)
        out["windowed"][doc_id] = res
    for doc_id, t, s in docs["prefix"]:   # literally "given tokens[s:t]", one forward each
        out["prefix"][f"{doc_id}:{t}"] = entropy(model(torch.tensor([docs["ids"][doc_id][s:t]])).logits[0, -1])
print(json.dumps(out))
"""

WORDS = ("the a cat dog sat on mat and ran x = 1 + 2 {braces} \\frac{a}{b} café naïve 漢字 数学 🙂 "
         "👩‍👩‍👧 sum of squares is prime n^2 ≤ ∑ proof hence").split()


def run(*args, check=True, env=None, timeout=300):
    proc = subprocess.run([str(a) for a in args], cwd=ROOT, env=env or ENV, capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _argv(w, prefix, *extra, proxy=None):
    proxy = proxy or ["--proxy-hf-dir", w["hf"]]
    return [str(a) for a in (sys.executable, "tools/build_rpt_data.py", "--input", w["corpus"], "--tokenizer-type",
                             "HuggingFaceTokenizer", "--tokenizer-model", w["hf"], *proxy, "--proxy-seq-length", SEQ,
                             "--min-context-tokens", CTX, "--heldout-docs", HELDOUT, "--proxy-threads", "1",
                             "--no-progress", "--output-prefix", prefix, *extra)]


def build(w, prefix, *extra, check=True, env=None, proxy=None):
    return run(*_argv(w, prefix, *extra, proxy=proxy), check=check, env=env)


def start(*argv):
    """A subprocess started now (the runs are mostly import time: two cores run them side by side)."""
    return subprocess.Popen([str(a) for a in argv], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    return out


def records(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def files(prefix) -> dict:
    return {s: Path(f"{prefix}{s}").read_bytes() for s in ("_train.jsonl", "_heldout.jsonl", ".meta.json")}


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    d = tmp_path_factory.mktemp("rpt")
    rng = random.Random(0)
    corpus = d / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for i in range(30):
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 120))]
            f.write(json.dumps({"text": " ".join(words), "id": f"d{i}"}, ensure_ascii=False) + "\n")
    w = {"dir": d, "corpus": str(corpus), "hf": str(d / "hf")}
    run(sys.executable, "-c", MAKE, w["hf"], corpus)
    w["base"], w["bs1"], w["max"], w["megatron"] = (str(d / k / "t") for k in ("base", "bs1", "max", "megatron"))
    ckpt = d / "ckpt"
    runs = [start(*_argv(w, w["base"], "--batch-size", "4")), start(*_argv(w, w["bs1"], "--batch-size", "1")),
            start(*_argv(w, w["max"], "--batch-size", "4", "--max-tasks-per-doc", "3")),
            start(sys.executable, "tools/convert_checkpoint.py", "import", "--hf-dir", w["hf"], "--save", ckpt,
                  "--no-progress")]
    w["base_out"] = finish(runs[0])
    for proc in runs[1:]:
        finish(proc)
    w["megatron_run"] = start(*_argv(w, w["megatron"], "--batch-size", "4", proxy=["--proxy-load", ckpt]))
    yield w
    w["megatron_run"].kill()


def test_entropies_and_filter_match_transformers_float64(w):
    from megatron_rpt.data.tokenizers import build_tokenizer
    from megatron_rpt.rpt.tasks import splits_for
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=w["hf"])
    texts = {f"corpus.jsonl:{i + 1}": json.loads(line)["text"] for i, line in enumerate(open(w["corpus"]))}
    ids = {k: tok.tokenize(v) for k, v in texts.items()}
    train, heldout = records(w["base"] + "_train.jsonl"), records(w["base"] + "_heldout.jsonl")
    rng = random.Random(1)
    prefix = []
    for r in rng.sample(train, 12):
        t = r["position"]
        start = 0 if t <= SEQ else None
        if start is not None:
            prefix.append([r["doc_id"], t, 0])
    docs = w["dir"] / "docs.json"
    docs.write_text(json.dumps({"ids": ids, "prefix": prefix}))
    ref = json.loads(run(sys.executable, "-c", REFERENCE, w["hf"], docs, SEQ, CTX).stdout.strip().splitlines()[-1])
    assert any(len(v) > SEQ for v in ids.values())   # some documents need several windows

    got = {r["id"]: r for r in train + heldout}
    expected, near = set(), set()
    for doc_id, per_t in ref["windowed"].items():
        text = texts[doc_id].encode()
        pieces = tok.token_bytes(ids[doc_id], at_start=True)
        offsets = [sum(len(p) for p in pieces[:t]) for t in range(len(pieces) + 1)]
        for t, e in per_t.items():
            t = int(t)
            boundary = offsets[t] == len(text) or text[offsets[t]] & 0xC0 != 0x80
            if abs(e - THRESHOLD) < 1e-5:
                near.add(f"{doc_id}:{t}")
            elif e > THRESHOLD and boundary:
                expected.add(f"{doc_id}:{t}")
            if f"{doc_id}:{t}" in got:
                assert got[f"{doc_id}:{t}"]["entropy"] == pytest.approx(e, abs=1e-5)
    assert set(got) - near == expected - near and len(expected) > 100
    for key, e in ref["prefix"].items():
        assert got[key]["entropy"] == pytest.approx(e, abs=1e-5)
    # Record fields agree with the tokenizer and the text.
    for r in train + heldout:
        t, doc_ids = r["position"], ids[r["doc_id"]]
        assert r["id"] == f"{r['doc_id']}:{t}" and t >= CTX
        assert r["context_tokens"] == doc_ids[:t] and r["target_tokens"] == doc_ids[t:t + 16]
        assert texts[r["doc_id"]].startswith(r["context"])
        assert r["context"].encode() == b"".join(tok.token_bytes(doc_ids[:t], at_start=True))
        assert [bytes.fromhex(h) for h in r["target_bytes"]] == tok.token_bytes(r["target_tokens"])
        assert r["splits"] == splits_for(r["entropy"]) and r["entropy"] > THRESHOLD
    # Splits populated and nested; meta counts equal the files; held out by document.
    meta = json.loads(Path(w["base"] + ".meta.json").read_text())
    for split, rs in (("train", train), ("heldout", heldout)):
        counts = meta["counts"][split]
        assert counts["tasks"] == len(rs)
        for name in ("easy", "medium", "hard"):
            assert counts[name] == sum(name in r["splits"] for r in rs)
    assert 0 < meta["counts"]["train"]["hard"] < meta["counts"]["train"]["medium"] < meta["counts"]["train"]["easy"]
    assert meta["counts"]["heldout"]["documents"] == HELDOUT and meta["counts"]["train"]["documents"] == 26
    assert {r["doc_id"] for r in train}.isdisjoint({r["doc_id"] for r in heldout}) and heldout
    assert meta["proxy"]["kind"] == "hf" and meta["tokenizer"]["vocab_size"] == tok.vocab_size
    assert meta["inputs"] == [{"path": os.path.abspath(w["corpus"]), "bytes": os.path.getsize(w["corpus"])}]
    from megatron_rpt.rpt.tasks import load_tasks
    loaded = load_tasks(w["base"] + "_train.jsonl")
    assert [t.id for t in loaded] == [r["id"] for r in train]
    assert "tasks/s" in w["base_out"]


def test_resume_after_sigkill_is_byte_identical(w):
    prefix = str(w["dir"] / "resume" / "t")
    env = dict(ENV, MRPT_RPT_DATA_KILL_AT_CHUNK="1")
    proc = build(w, prefix, "--batch-size", "4", env=env, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    progress = json.loads(Path(prefix + ".progress.json").read_text())
    assert 0 < progress["docs_done"] < 30
    assert os.path.getsize(prefix + "_train.jsonl.tmp") > progress["bytes"]["train"]   # uncommitted records
    assert not os.path.exists(prefix + "_train.jsonl")
    # Another setting cannot continue this run.
    proc = build(w, prefix, "--batch-size", "4", "--entropy-threshold", "0.7", check=False)
    assert proc.returncode == 2 and "entropy_threshold" in proc.stderr and ".progress.json" in proc.stderr
    proc = build(w, prefix, "--batch-size", "4")
    assert f"resuming {prefix}: {progress['docs_done']} of 30 documents" in proc.stdout
    assert files(prefix) == files(w["base"])
    assert not os.path.exists(prefix + ".progress.json") and not os.path.exists(prefix + "_train.jsonl.tmp")


def test_batch_size_changes_entropies_by_rounding_only(w):
    prefix = w["bs1"]
    a = {r["id"]: r for r in records(w["base"] + "_train.jsonl")}
    b = {r["id"]: r for r in records(prefix + "_train.jsonl")}
    for key in set(a) ^ set(b):   # only positions within rounding of the threshold may differ
        assert abs((a.get(key) or b.get(key))["entropy"] - THRESHOLD) < 1e-5
    diff = max(abs(a[k]["entropy"] - b[k]["entropy"]) for k in set(a) & set(b))
    assert diff < 1e-5   # measured 1.7e-6: MKL rounds a row differently in a larger batch


def test_max_tasks_per_doc_is_a_seeded_subset(w):
    prefix = w["max"]
    base = {r["id"]: r for r in records(w["base"] + "_train.jsonl")}
    got = records(prefix + "_train.jsonl")
    per_doc: dict = {}
    for r in got:
        assert r == base[r["id"]]
        per_doc.setdefault(r["doc_id"], []).append(r["position"])
    assert all(len(v) <= 3 and v == sorted(v) for v in per_doc.values())
    full = {}
    for r in base.values():
        full[r["doc_id"]] = full.get(r["doc_id"], 0) + 1
    assert all(len(per_doc.get(d, [])) == min(3, n) for d, n in full.items())


def test_megatron_checkpoint_proxy_gives_the_hf_entropies(w):
    prefix = w["megatron"]
    finish(w["megatron_run"])   # started by the fixture, ran beside the other tests
    a = {r["id"]: r for r in records(w["base"] + "_train.jsonl")}
    b = {r["id"]: r for r in records(prefix + "_train.jsonl")}
    for key in set(a) ^ set(b):
        assert abs((a.get(key) or b.get(key))["entropy"] - THRESHOLD) < 1e-5
    assert max(abs(a[k]["entropy"] - b[k]["entropy"]) for k in set(a) & set(b)) < 1e-5
    meta = json.loads(Path(prefix + ".meta.json").read_text())
    assert meta["proxy"]["kind"] == "megatron" and meta["proxy"]["iteration"] == 0


def test_bad_input_is_one_clear_error(w, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": "broken\n')
    proc = run(sys.executable, "tools/build_rpt_data.py", "--input", bad, "--tokenizer-type", "HuggingFaceTokenizer",
               "--tokenizer-model", w["hf"], "--proxy-hf-dir", w["hf"], "--output-prefix", tmp_path / "o",
               check=False)
    assert proc.returncode == 2 and f"{bad}:3: malformed JSON" in proc.stderr
    bad.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    proc = run(sys.executable, "tools/build_rpt_data.py", "--input", bad, "--tokenizer-type", "HuggingFaceTokenizer",
               "--tokenizer-model", w["hf"], "--proxy-hf-dir", w["hf"], "--output-prefix", tmp_path / "o",
               check=False)
    assert proc.returncode == 2 and f"{bad}:2: missing or non-string key 'text'" in proc.stderr
    proc = run(sys.executable, "tools/build_rpt_data.py", "--input", tmp_path / "nothing*.jsonl", "--tokenizer-type",
               "HuggingFaceTokenizer", "--tokenizer-model", w["hf"], "--proxy-hf-dir", w["hf"], "--output-prefix",
               tmp_path / "o", check=False)
    assert proc.returncode == 2 and "no such file" in proc.stderr
    assert not list(tmp_path.glob("o*"))


def test_tokenizer_problems_are_one_clear_error(w, tmp_path):
    # A normalising tokenizer (lowercase) cannot give byte-exact targets: the first document is named.
    spec = json.loads(Path(w["hf"], "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Lowercase"}
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "tokenizer.json").write_text(json.dumps(spec))
    upper = tmp_path / "upper.jsonl"
    upper.write_text('{"text": "All lower case here is fine"}\n' * 2)
    proc = run(sys.executable, "tools/build_rpt_data.py", "--input", upper, "--tokenizer-type", "HuggingFaceTokenizer",
               "--tokenizer-model", lower / "tokenizer.json", "--proxy-hf-dir", w["hf"], "--min-context-tokens", "2",
               "--output-prefix", tmp_path / "o", check=False)
    assert proc.returncode == 2 and f"{upper}:1: the HuggingFaceTokenizer's tokens do not reproduce" in proc.stderr
    assert "first difference at byte 0" in proc.stderr
    # A policy tokenizer with another vocabulary than the proxy's.
    from megatron_rpt.data.tokenizers import iter_texts, train_byte_level_bpe
    other = train_byte_level_bpe(list(iter_texts([w["corpus"]]))[::-1], str(tmp_path / "other"), vocab_size=300)
    proc = run(sys.executable, "tools/build_rpt_data.py", "--input", w["corpus"], "--tokenizer-type",
               "HuggingFaceTokenizer", "--tokenizer-model", other, "--proxy-hf-dir", w["hf"], "--output-prefix",
               tmp_path / "o", check=False)
    assert proc.returncode == 2 and "tokenizer" in proc.stderr and "vocabular" in proc.stderr
    assert not list(tmp_path.glob("o_*")) and not list(tmp_path.glob("o.*"))   # nothing written
