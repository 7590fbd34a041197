"""tools/build_rpt_data.py end to end on a tiny random Llama (transformers, save_pretrained) with a
byte-level BPE trained here: entropies equal a float64 computation from transformers' own logits,
the entropy/context/UTF-8 filter keeps exactly the right positions, records are consistent with
the tokenizer, held-out split by document, resume after SIGKILL is byte-identical, --batch-size
changes nothing in float64, a Megatron checkpoint of the same weights (tools/convert_checkpoint.py
import) is scored exactly as Megatron-Core's own forward scores it and gives transformers'
entropies, and bad input is one clear error.

Tolerances. Comparisons that are float64 on both sides in the same implementation are exact
(1e-10: the Megatron proxy, whose only fp32 step is the RoPE table, identical on both sides). Any
comparison with fp32 arithmetic in it (the default fp32 proxy; transformers, whose RMSNorm and RoPE
stay fp32 even in a float64 model) uses a per-position bound derived from it: to first order
|dH| <= S * max|dz| with S = sum_i p_i |log p_i + H| over the top 16 (a swap of the 16th and 17th
logits adds at most another S * max|dz|), and max|dz| <= 2 * DELTA, where DELTA is this model's
fp32 logit rounding (max |z_fp32 - z_fp64| over every scored row, measured by the reference): the
other side rounds the same arithmetic in another blocking. Hence tol = 4 * S * DELTA (~1e-4 at
most here; a wrong window, position or weight moves entropies by > 1e-2).

Every model computation runs in a child process (the tool, or a reference script; forked by
tests/cli.py), never in pytest.
"""

from __future__ import annotations

import importlib
import json
import os
import random
import re
import signal
import sys
from pathlib import Path

import pytest

from tests.cli import run_python, start_python

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")
SEQ, CTX, THRESHOLD, HELDOUT = 48, 8, 0.5, 4
EXACT = 1e-10

MAKE = """
import sys, torch, transformers
from megatron_rpt.data.jsonl import iter_texts
from megatron_rpt.data.tokenizers.training import train_byte_level_bpe
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

# The references, one forward per window by the documented rule (window k scores (end_{k-1}, end_k],
# starting CTX tokens before its first target), and per "prefix" literally given tokens[s:t]:
# - transformers' full logits (model(input_ids).logits) in float64 and fp32: top-16 entropy and its
#   sensitivity S (float64 logits), and DELTA = max |z_fp32 - z_fp64| (module docstring);
# - Megatron-Core's own GPTModel forward (output layer included) on the imported checkpoint, float64,
#   every window right-padded to one length (causal: padding cannot reach the scored positions).
REFERENCE = """
import json, math, sys, torch, transformers
folder, ckpt, docs_path, seq, ctx = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
from megatron_rpt.config.schema import RunConfig
from megatron_rpt.convert.checkpoint import _single_process_model, _teardown
from megatron_rpt.models.gpt import padded_vocab_size
from megatron_rpt.checkpoint.layout import checkpoint_path
from megatron_rpt.checkpoint.sharded import load_weights
hf = {dt: transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dt).eval()
      for dt in (torch.float32, torch.float64)}
vocab = hf[torch.float64].config.vocab_size
cfg = RunConfig.from_dict(json.load(open(checkpoint_path(ckpt, 0) + "/run_config.json"))["run_config"])
mg = _single_process_model(cfg, padded_vocab_size(cfg.model.vocab_size, cfg.model.make_vocab_size_divisible_by, 1))[0]
load_weights(ckpt, [mg])
mg = mg.double().eval()
PAD = 64
def stats(row):
    top = row.double().topk(16).values
    logp = torch.log_softmax(top, -1)
    h = -(logp.exp() * logp).sum()
    return h.item(), (logp.exp() * (logp + h).abs()).sum().item()
delta = 0.0
def score(ids, rows):
    global delta
    x = torch.tensor([ids])
    z64, z32 = hf[torch.float64](x).logits[0], hf[torch.float32](x).logits[0].double()
    pad = torch.tensor([ids + [0] * (PAD - len(ids))])
    mask = torch.triu(torch.ones(PAD, PAD, dtype=torch.bool), diagonal=1)[None, None]
    zm = mg(pad, torch.arange(PAD)[None], mask)[0, :len(ids), :vocab]
    out = []
    for r in rows:
        delta = max(delta, (z32[r] - z64[r]).abs().max().item())
        h, s = stats(z64[r])
        out.append({"hf": h, "S": s, "megatron": stats(zm[r])[0]})
    return out
res = {"windowed": {}, "prefix": {}}
docs = json.load(open(docs_path))
with torch.no_grad():
    for doc_id, ids in docs["ids"].items():
        n, per_t = len(ids), {}
        start, end = 0, min(seq, n - 1)
        while n - 1 >= ctx:
            ts = list(range(start + ctx, end + 1))
            per_t.update(zip(ts, score(ids[start:end], [t - start - 1 for t in ts])))
            if end >= n - 1:
                break
            start = end + 1 - ctx
            end = min(start + seq, n - 1)
        res["windowed"][doc_id] = per_t
    for doc_id, t, s in docs["prefix"]:
        res["prefix"][f"{doc_id}:{t}"] = score(docs["ids"][doc_id][s:t], [t - s - 1])[0]
res["delta"] = delta
_teardown()
print(json.dumps(res))
"""

WORDS = ("the a cat dog sat on mat and ran x = 1 + 2 {braces} \\frac{a}{b} café naïve 漢字 数学 🙂 "
         "👩‍👩‍👧 sum of squares is prime n^2 ≤ ∑ proof hence").split()


def run(*args, check=True, env=None, timeout=300):
    proc = run_python(args, env=env or ENV, timeout=timeout)   # forked, not a fresh interpreter (tests/cli.py)
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
    """A run started now (two cores run them side by side)."""
    return start_python(argv, env=ENV)


def finish(proc) -> str:
    r = proc.finish()
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


def records(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def files(prefix) -> dict:
    return {s: Path(f"{prefix}{s}").read_bytes() for s in ("_train.jsonl", "_heldout.jsonl", ".meta.json")}


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    from megatron_rpt.data.tokenizers import build_tokenizer
    d = tmp_path_factory.mktemp("rpt")
    rng = random.Random(0)
    corpus = d / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for i in range(30):
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 120))]
            f.write(json.dumps({"text": " ".join(words), "id": f"d{i}"}, ensure_ascii=False) + "\n")
    w = {"dir": d, "corpus": str(corpus), "hf": str(d / "hf")}
    run(sys.executable, "-c", MAKE, w["hf"], corpus)
    for k in ("base", "max", "mg64", "mg64_bs1"):
        w[k] = str(d / k / "t")
    ckpt = d / "ckpt"
    runs = [start(*_argv(w, w["base"], "--batch-size", "4")),
            start(*_argv(w, w["max"], "--batch-size", "4", "--max-tasks-per-doc", "3")),
            start(sys.executable, "tools/convert_checkpoint.py", "import", "--hf-dir", w["hf"], "--save", ckpt,
                  "--no-progress")]
    finish(runs[2])
    # The documents as the tool tokenizes them, and prefixes in the first window (t <= SEQ) for the
    # reference's literal "given tokens[0:t]" forwards.
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=w["hf"])
    w["tok"] = tok
    w["texts"] = {f"corpus.jsonl:{i + 1}": json.loads(line)["text"] for i, line in enumerate(open(corpus))}
    w["ids"] = {k: tok.tokenize(v) for k, v in w["texts"].items()}
    firsts = [(k, t) for k, v in w["ids"].items() for t in range(CTX, min(SEQ, len(v) - 1) + 1)]
    docs = d / "docs.json"
    docs.write_text(json.dumps({"ids": w["ids"], "prefix": [[k, t, 0] for k, t in random.Random(1).sample(firsts, 40)]}))
    w["reference_run"] = start(sys.executable, "-c", REFERENCE, w["hf"], ckpt, docs, SEQ, CTX)
    w["base_out"] = finish(runs[0])
    finish(runs[1])
    # The Megatron proxy in float64 at two batch sizes (started now, they run beside the next tests).
    megatron = ["--proxy-load", ckpt]
    w["mg64_runs"] = [start(*_argv(w, w["mg64"], "--batch-size", "4", "--proxy-dtype", "fp64", proxy=megatron)),
                      start(*_argv(w, w["mg64_bs1"], "--batch-size", "1", "--proxy-dtype", "fp64", proxy=megatron))]
    yield w
    for proc in (w["reference_run"], *w.get("mg64_runs", [])):
        proc.kill()


def reference(w) -> dict:
    """The reference script's result (module docstring), with `tol` per position: 4 * S * DELTA."""
    if "reference" not in w:
        ref = json.loads(finish(w["reference_run"]).strip().splitlines()[-1])
        assert 0 < ref["delta"] < 1e-3, ref["delta"]   # fp32 rounding of this model: measured 4e-5
        for r in [*ref["prefix"].values(), *(r for per_t in ref["windowed"].values() for r in per_t.values())]:
            r["tol"] = 4 * r["S"] * ref["delta"] + EXACT
        w["reference"] = ref
    return w["reference"]


def megatron_runs(w) -> None:
    for proc in w.pop("mg64_runs", []):
        finish(proc)


def by_id(prefix) -> dict:
    return {r["id"]: r for r in records(prefix + "_train.jsonl") + records(prefix + "_heldout.jsonl")}


def check_entropies(got: dict, ref: dict, side: str, tol=None) -> None:
    """`got` (records by id) holds exactly the positions the reference's `side` entropies select
    (entropy > THRESHOLD at a UTF-8 character boundary), except within tolerance of THRESHOLD,
    and every entropy is within tolerance (`tol`, else the reference's per-position bound)."""
    scored, expected, near = set(), set(), set()
    for doc_id, per_t in ref["windowed"].items():
        for t, r in per_t.items():
            key, e, bound = f"{doc_id}:{t}", r[side], tol if tol is not None else r["tol"]
            scored.add(key)
            if abs(e - THRESHOLD) <= bound:
                near.add(key)
            elif e > THRESHOLD and ref["boundary"][key]:
                expected.add(key)
            if key in got:
                assert abs(got[key]["entropy"] - e) <= bound, (key, got[key]["entropy"], e, bound)
    assert set(got) <= scored
    assert set(got) - near == expected - near and len(expected) > 100


def with_boundaries(w, ref: dict) -> dict:
    """ref["boundary"][doc:t]: position t starts a UTF-8 character of the document's text."""
    if "boundary" not in ref:
        ref["boundary"] = {}
        for doc_id, per_t in ref["windowed"].items():
            text = w["texts"][doc_id].encode()
            pieces = w["tok"].token_bytes(w["ids"][doc_id], at_start=True)
            offsets = [0]
            for p in pieces:
                offsets.append(offsets[-1] + len(p))
            for t in per_t:
                o = offsets[int(t)]
                ref["boundary"][f"{doc_id}:{t}"] = o == len(text) or text[o] & 0xC0 != 0x80
    return ref


def test_entropies_and_filter_match_transformers_float64(w):
    """The default fp32 proxy against transformers' float64 logits, within the derived bound."""
    from megatron_rpt.rpt.tasks import splits_for
    tok, texts, ids = w["tok"], w["texts"], w["ids"]
    ref = with_boundaries(w, reference(w))
    assert any(len(v) > SEQ for v in ids.values())   # some documents need several windows
    train, heldout = records(w["base"] + "_train.jsonl"), records(w["base"] + "_heldout.jsonl")
    got = {r["id"]: r for r in train + heldout}
    check_entropies(got, ref, "hf")
    prefixes = [(k, r) for k, r in ref["prefix"].items() if k in got]
    assert len(prefixes) >= 10
    for key, r in prefixes:
        assert abs(got[key]["entropy"] - r["hf"]) <= r["tol"], (key, got[key]["entropy"], r)
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
    assert meta["proxy"]["kind"] == "hf" and meta["proxy"]["dtype"] == "fp32"
    assert meta["tokenizer"]["vocab_size"] == tok.vocab_size
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


def test_megatron_checkpoint_proxy_is_megatron_core_exactly(w):
    """--proxy-load --proxy-dtype fp64 scores what Megatron-Core's own float64 forward gives (exact)."""
    megatron_runs(w)
    ref = with_boundaries(w, reference(w))
    check_entropies(by_id(w["mg64"]), ref, "megatron", tol=EXACT)
    meta = json.loads(Path(w["mg64"] + ".meta.json").read_text())
    assert meta["proxy"]["kind"] == "megatron" and meta["proxy"]["iteration"] == 0
    assert meta["proxy"]["dtype"] == "fp64"


def test_batch_size_changes_nothing_in_float64(w):
    """Batching is exact: in float64 (Megatron proxy) --batch-size 1 and 4 agree to 1e-10; in fp32
    they differ by GEMM rounding only (CPU kernels block the summation by row count)."""
    megatron_runs(w)
    a, b = by_id(w["mg64"]), by_id(w["mg64_bs1"])
    assert set(a) == set(b)
    assert max(abs(a[k]["entropy"] - b[k]["entropy"]) for k in a) <= EXACT


def test_megatron_checkpoint_proxy_gives_the_hf_entropies(w):
    """Megatron-Core on the imported checkpoint against transformers on the HF folder, both float64:
    within the derived bound (transformers' RMSNorm and RoPE stay fp32); the tool's tasks too."""
    megatron_runs(w)
    ref = with_boundaries(w, reference(w))
    check_entropies(by_id(w["mg64"]), ref, "hf")
    for per_t in ref["windowed"].values():
        for r in per_t.values():
            assert abs(r["megatron"] - r["hf"]) <= r["tol"], r
    for r in ref["prefix"].values():
        assert abs(r["megatron"] - r["hf"]) <= r["tol"], r


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
    assert proc.returncode == 2 and f"{bad}:2: missing key 'text'" in proc.stderr
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
    from megatron_rpt.data.jsonl import iter_texts
    from megatron_rpt.data.tokenizers.training import train_byte_level_bpe
    other = train_byte_level_bpe(list(iter_texts([w["corpus"]]))[::-1], str(tmp_path / "other"), vocab_size=300)
    proc = run(sys.executable, "tools/build_rpt_data.py", "--input", w["corpus"], "--tokenizer-type",
               "HuggingFaceTokenizer", "--tokenizer-model", other, "--proxy-hf-dir", w["hf"], "--output-prefix",
               tmp_path / "o", check=False)
    assert proc.returncode == 2 and "tokenizer" in proc.stderr and "vocabular" in proc.stderr
    assert not list(tmp_path.glob("o_*")) and not list(tmp_path.glob("o.*"))   # nothing written


# ----------------------------------------------------------------------------- RLVR: tools/build_rl_data.py

def _problems(prefix):
    from megatron_rpt.rpt.tasks import load_problems
    return load_problems(f"{prefix}_train.jsonl"), load_problems(f"{prefix}_heldout.jsonl")


def test_build_rl_data_reasoning_gym_chain_sum(tmp_path):
    """Counts, answers equal to the expression's value (Python's arithmetic), no question twice nor in
    both files, the same seed the same bytes, another seed other problems."""
    importlib.import_module("reasoning_gym")   # imported once here (2 s), not in each forked run
    config = '{"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}'
    outputs = {}
    for name, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        proc = run(sys.executable, "tools/build_rl_data.py", "--dataset", "chain_sum", "--dataset-config", config,
                   "--train-size", "40", "--heldout-size", "12", "--seed", seed,
                   "--output-prefix", str(tmp_path / name))
        assert "reasoning_gym/chain_sum: 40 train" in proc.stdout and "12 held-out" in proc.stdout
        outputs[name] = [(tmp_path / f"{name}_{s}.jsonl").read_bytes() for s in ("train", "heldout")]
    assert outputs["a"] == outputs["b"] and outputs["a"] != outputs["c"]
    train, heldout = _problems(tmp_path / "a")
    assert len(train) == 40 and len(heldout) == 12
    questions = [p.question for p in train + heldout]
    assert len(set(questions)) == len(questions)
    for p in train + heldout:
        expression = p.question.rsplit(":", 1)[1].rstrip("= ").strip()
        assert re.fullmatch(r"[0-9 +-]+", expression) and int(p.answer) == eval(expression), p   # digits, + and - only
        assert p.family == "math" and p.source == "reasoning_gym/chain_sum" and p.splits == []
    meta = json.loads((tmp_path / "a.meta.json").read_text())
    assert meta["format"] == "mrpt-rl-problems/1" and meta["seed"] == 7 and meta["dataset_config"]["max_terms"] == 3
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    # 1-digit sums of two terms have 19 x 19 distinct questions at most: asking for more is one error
    proc = run(sys.executable, "tools/build_rl_data.py", "--dataset", "chain_sum", "--dataset-config",
               '{"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}', "--train-size", "400",
               "--output-prefix", str(tmp_path / "d"), check=False)
    assert proc.returncode == 2 and "distinct train questions" in proc.stderr and "Traceback" not in proc.stderr


def test_build_rl_data_champ(tmp_path):
    """CHAMP: problems without a short final answer are skipped and counted; held-out is a seeded choice."""
    proc = run(sys.executable, "tools/build_rl_data.py", "--champ", "--heldout-size", "10", "--seed", "3",
               "--output-prefix", str(tmp_path / "champ"))
    train, heldout = _problems(tmp_path / "champ")
    meta = json.loads((tmp_path / "champ.meta.json").read_text())
    assert len(train) + len(heldout) + meta["skipped_without_short_answer"] == 270 and len(heldout) == 10
    assert f"{meta['skipped_without_short_answer']} skipped" in proc.stdout
    assert not {p.id for p in train} & {p.id for p in heldout}
    answers = {p.id: p.answer for p in train + heldout}
    assert answers["champ/P_Combinatorics_1"] == "239"                       # kept as written
    by_answer = {p.answer for p in train + heldout}
    assert not {"No", "Yes"} & by_answer                                     # yes/no and prose are skipped
    assert all(not re.search("[A-Za-z]{2}", a) for a in by_answer)
    assert {s for p in train for s in p.splits} <= {"combinatorics", "inequality", "number-theory", "polynomial",
                                                    "sequence"}
    assert all(p.solution and p.source == "champ" for p in train)
    # the held-out choice is the seed's: the same seed the same split, another seed another one
    from megatron_rpt.demo_assets.corpus import champ_problems
    from megatron_rpt.rpt.tasks.problem_sources import champ_problem_set
    records = champ_problems()
    assert champ_problem_set(records, 10, 3)[1] == heldout
    assert champ_problem_set(records, 10, 4)[1] != heldout
