"""The external rollout engine (`megatron_rpt.inference.external`) against real HTTP servers.

A tiny random HF Llama is served by `tests/serve_hf_openai.py` in a subprocess; transformers, in
another long-lived subprocess, is the reference: greedy rollouts must be its greedy continuation,
every returned log-prob its log_softmax(z / T) at the sampling temperature over the full vocabulary
(the server's default "tempered" mode; "raw" is temperature 1; float32, atol 1e-4). Weight reloads
(the SGLang, vLLM, custom-endpoint and restart protocols) must switch the served log-probs to the new
model's, and sync_weights from a Megatron checkpoint (imported from the HF folder by
tools/convert_checkpoint.py) must serve the original weights from the rolling <sync_dir>/hf folder.
The publication order of a sync (the new folder under the served name before the reload, the old
one kept until the reload succeeded) and the collective contract of sync_weights use a stub export.
Malformed answers, HTTP errors and an unreachable server come from a stdlib fake server in a thread
and must raise RolloutErrors naming the URL. No torch work runs in the pytest process (tests/parallel
forks ranks from it). The collective `generate` at TP/CP > 1: tests/parallel/test_external_collective.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from megatron_rpt.distributed import free_port
from megatron_rpt.inference.base import RolloutError, SamplingConfig
from megatron_rpt.inference.external import OpenAICompatibleEngine

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SERVER = os.path.join(REPO, "tests", "serve_hf_openai.py")
ATOL = 1e-4
EOS = 2
PROMPTS = [[1, 5, 9, 17], [1, 40, 41], [1, 7, 100, 3, 64, 90, 12]]

_MAKE_MODELS = r"""
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
vocab, hidden = int(sys.argv[1]), int(sys.argv[2])
for folder, seed in zip(sys.argv[3::2], sys.argv[4::2]):
    torch.manual_seed(int(seed))
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=vocab,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    m = LlamaForCausalLM(cfg)
    with torch.no_grad():          # random init gives near-uniform outputs; sharpen them
        m.lm_head.weight.mul_(8.0)
    m.save_pretrained(folder)
"""


def make_models(folders: list, *, vocab: int = 128, hidden: int = 64) -> None:
    """A tiny random Llama (2 layers, 4 heads, GQA 2; head_dim = hidden / 4) per folder, seeds 0, 1, ...,
    saved as HF folders (in a subprocess: no torch work in the test process before forking)."""
    seeded = [str(x) for i, f in enumerate(folders) for x in (f, i)]
    subprocess.run([sys.executable, "-c", _MAKE_MODELS, str(vocab), str(hidden), *seeded], check=True)

# JSON lines in, JSON lines out: {"model", "greedy": [[prompt, k]...], "score": [[prompt, tokens(, T)]...]};
# a score is log_softmax(logits / T) of each token (T = 1 when not given).
_REFERENCE = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(1)
models = {}
for line in sys.stdin:
    job = json.loads(line)
    m = models.get(job["model"])
    if m is None:
        m = models[job["model"]] = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32).eval()
    out = {"greedy": [], "score": []}
    with torch.no_grad():
        for prompt, k in job.get("greedy", []):
            ids = list(prompt)
            for _ in range(k):
                ids.append(int(m(torch.tensor([ids])).logits[0, -1].argmax()))
            out["greedy"].append(ids[len(prompt):])
        for prompt, tokens, *temperature in job.get("score", []):
            ids = torch.tensor([list(prompt) + list(tokens)])
            lp = torch.log_softmax(m(ids).logits[0].float() / (temperature[0] if temperature else 1.0), dim=-1)
            out["score"].append([float(lp[len(prompt) - 1 + i, t]) for i, t in enumerate(tokens)])
    print(json.dumps(out), flush=True)
"""


class Reference:
    """transformers in a child process (one import for the whole module)."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", _REFERENCE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def __call__(self, model: str, greedy=(), score=()) -> dict:
        self.proc.stdin.write(json.dumps({"model": model, "greedy": list(greedy), "score": list(score)}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the reference process died"
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(30)


def start_server(model: str, port: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, SERVER, "--model", model, "--port", str(port), "--threads", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_healthy(proc: subprocess.Popen, port: int, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}: {proc.stderr.read()}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("server did not become healthy")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("external")
    a, b = str(root / "model_a"), str(root / "model_b")
    make_models([a, b])
    port = free_port()
    server = start_server(a, port)          # loads while the reference process imports torch
    ref = Reference()
    try:
        wait_healthy(server, port)
        yield {"root": root, "a": a, "b": b, "port": port, "url": f"http://127.0.0.1:{port}", "ref": ref,
               "server": server}
    finally:
        stop(server)
        ref.close()


def _close_logprobs(rollouts, scores):
    for r, s in zip(rollouts, scores):
        assert len(r.log_probs) == len(s)
        assert max((abs(x - y) for x, y in zip(r.log_probs, s)), default=0.0) < ATOL, (r.log_probs, s)


def _assert_serves(engine, ref, model):
    """The served log-probs of a greedy rollout are `model`'s."""
    out = engine.generate(PROMPTS[:2], 1, SamplingConfig(max_new_tokens=6, top_k=1, stop_at_eod=False))
    rollouts = [g[0] for g in out]
    scores = ref(model, score=[[p, r.tokens] for p, r in zip(PROMPTS, rollouts)])["score"]
    _close_logprobs(rollouts, scores)
    return rollouts


# ---- generation ---------------------------------------------------------------------------------
@pytest.mark.slow   # a fresh interpreter / server process
def test_greedy_rollouts_equal_transformers(env):
    engine = OpenAICompatibleEngine(env["url"])
    k = 12
    out = engine.generate(PROMPTS, 1, SamplingConfig(max_new_tokens=k, top_k=1, stop_at_eod=False))
    ref = env["ref"](env["a"], greedy=[[p, k] for p in PROMPTS])
    assert [g[0].tokens for g in out] == ref["greedy"]
    scores = env["ref"](env["a"], score=[[p, g[0].tokens] for p, g in zip(PROMPTS, out)])["score"]
    _close_logprobs([g[0] for g in out], scores)
    assert all(not g[0].finished and len(g[0].tokens) == k for g in out)
    assert engine.model == env["a"]          # discovered from /v1/models
    engine.close()


@pytest.mark.slow   # a fresh interpreter / server process
def test_sampled_rollouts_n_seed_and_logprob_modes(env):
    engine = OpenAICompatibleEngine(env["url"], max_inflight=2)
    s = SamplingConfig(max_new_tokens=8, temperature=0.7, top_p=0.9, top_k=20, seed=3, stop_at_eod=False)
    out = engine.generate(PROMPTS, 4, s)
    assert [len(g) for g in out] == [4, 4, 4]
    flat = [(p, r) for p, g in zip(PROMPTS, out) for r in g]
    # tempered (the server's default): log softmax(z / 0.7) over the full vocabulary, whatever top-p/top-k cut
    scores = env["ref"](env["a"], score=[[p, r.tokens, 0.7] for p, r in flat])["score"]
    _close_logprobs([r for _, r in flat], scores)
    at_one = env["ref"](env["a"], score=[[p, r.tokens] for p, r in flat])["score"]
    assert max(abs(x - y) for r, z in zip([r for _, r in flat], at_one) for x, y in zip(r.log_probs, z)) > 0.1
    # raw (temperature 1): the engine refuses it at another sampling temperature (no way to convert) ...
    raw = OpenAICompatibleEngine(env["url"], logprobs="raw", extra_body={"logprobs_mode": "raw"})
    with pytest.raises(ValueError, match="cannot be rebuilt"):
        raw.generate(PROMPTS, 1, s)
    # ... and passes it through at temperature 1 (the same value as tempered there)
    s1 = SamplingConfig(**{**s.__dict__, "temperature": 1.0})
    got = [r for g in raw.generate(PROMPTS, 2, s1) for r in g]
    _close_logprobs(got, env["ref"](env["a"], score=[[p, r.tokens] for p, r in zip([q for q in PROMPTS for _ in
                                                                                     range(2)], got)])["score"])
    assert len({tuple(r.tokens) for r in out[0]}) > 1, "n samples of one prompt should differ"
    again = engine.generate(PROMPTS, 4, s)
    assert [[r.tokens for r in g] for g in again] == [[r.tokens for r in g] for g in out]   # same seed
    other = engine.generate(PROMPTS, 4, SamplingConfig(**{**s.__dict__, "seed": 4}))
    assert [[r.tokens for r in g] for g in other] != [[r.tokens for r in g] for g in out]
    engine.close()


@pytest.mark.slow   # a fresh interpreter / server process
def test_eod_finishes_and_max_tokens_cuts(env):
    k = 10
    greedy = env["ref"](env["a"], greedy=[[p, k] for p in PROMPTS])["greedy"]
    g = greedy[2]
    eod = g[3]
    cut = next(i for i, t in enumerate(g) if t in (eod, EOS)) + 1     # the stop token is included
    engine = OpenAICompatibleEngine(env["url"], eod_token_id=eod)
    out = engine.generate([PROMPTS[2]], 1, SamplingConfig(max_new_tokens=k, top_k=1))[0][0]
    assert out.tokens == g[:cut] and out.finished and out.extra["finish_reason"] == "stop"
    assert len(out.log_probs) == cut
    # stop_at_eod=False: the response runs to max_new_tokens and is cut (not finished)
    out = engine.generate([PROMPTS[2]], 1, SamplingConfig(max_new_tokens=k, top_k=1, stop_at_eod=False))[0][0]
    assert out.tokens == g and not out.finished


@pytest.mark.slow   # a fresh interpreter / server process
def test_server_side_errors_name_the_url(env):
    engine = OpenAICompatibleEngine(env["url"], max_retries=0)
    with pytest.raises(RolloutError, match=rf"{env['url']}/v1/completions: HTTP 400.*token ids must be"):
        engine.generate([[1, 500]], 1, SamplingConfig(max_new_tokens=2))
    with pytest.raises(RolloutError, match="exceed the model's context length"):
        engine.generate([[1, 2]], 1, SamplingConfig(max_new_tokens=200))
    with pytest.raises(RolloutError, match="prompt 0 is empty"):
        engine.generate([[]], 1, SamplingConfig(max_new_tokens=2))
    wrong = OpenAICompatibleEngine(env["url"], model="no-such-model")
    with pytest.raises(RolloutError, match="no-such-model"):
        wrong.generate([[1, 2]], 1, SamplingConfig(max_new_tokens=2))


# ---- a fake server for malformed answers ---------------------------------------------------------
class _Fake(BaseHTTPRequestHandler):
    script: list = []           # (status, body bytes) answered in order, the last one repeated
    calls = 0

    def log_message(self, *args):
        pass

    def _answer(self):
        cls = type(self)
        status, body = cls.script[min(cls.calls, len(cls.script) - 1)]
        cls.calls += 1
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._answer()

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._answer()


@pytest.fixture()
def fake():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Fake)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def run(*script, n=1, **kw):
        _Fake.script, _Fake.calls = [(s, b if isinstance(b, bytes) else json.dumps(b).encode()) for s, b in script], 0
        engine = OpenAICompatibleEngine(f"http://127.0.0.1:{server.server_address[1]}", model="m", backoff=0.01, **kw)
        return engine.generate([[1, 2, 3]], n, SamplingConfig(max_new_tokens=2))

    run.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield run
    server.shutdown()
    server.server_close()


def _choice(index=0, tokens=(5, 6), lps=(-0.5, -1.0), reason="length", **over):
    c = {"index": index, "text": "x", "finish_reason": reason, "token_ids": list(tokens),
         "logprobs": {"tokens": [f"token_id:{t}" for t in tokens], "token_logprobs": list(lps)}}
    c.update(over)
    return c


def test_malformed_answers_raise(fake):
    url = fake.url + "/v1/completions"
    ok = fake((200, {"choices": [_choice(1, reason="stop"), _choice(0)]}), n=2)
    assert [r.finished for r in ok[0]] == [False, True]                  # ordered by index
    assert ok[0][0].tokens == [5, 6] and ok[0][0].log_probs == [-0.5, -1.0]
    no_ids = _choice()
    del no_ids["token_ids"]                                              # ids from "token_id:N"
    assert fake((200, {"choices": [no_ids]}))[0][0].tokens == [5, 6]
    cases = [
        ((500, b"boom: engine dead"), rf"{url}: HTTP 500.*boom: engine dead"),
        ((200, b"<html>not json"), rf"{url}: response is not JSON.*not json"),
        ((200, {"choices": [_choice(), _choice(1)]}), r"asked for n=1 responses, got 2"),
        ((200, {"choices": [_choice(logprobs=None)]}), r"no logprobs.token_logprobs"),
        ((200, {"choices": [_choice(lps=(-0.5, None))]}), r"missing \(null\)"),
        ((200, {"choices": [_choice(lps=(-0.5,))]}), r"2 tokens but 1 log-probs"),
        ((200, {"choices": [_choice(reason="abort")]}), r"finish_reason 'abort'"),
        ((200, {"error": "x"}), r"no `choices` list"),
    ]
    for answer, pattern in cases:
        with pytest.raises(RolloutError, match=pattern):
            fake(answer)
    bad_tokens = _choice(logprobs={"tokens": ["a", "b"], "token_logprobs": [-1.0, -1.0]})
    del bad_tokens["token_ids"]
    with pytest.raises(RolloutError, match="return_tokens_as_token_ids"):
        fake((200, {"choices": [bad_tokens]}))


def test_retries_then_unreachable(fake):
    # 503 twice (a restarting server), then an answer: retried with backoff
    out = fake((503, b"loading"), (503, b"loading"), (200, {"choices": [_choice()]}), max_retries=2)
    assert out[0][0].tokens == [5, 6] and _Fake.calls == 3
    with pytest.raises(RolloutError, match=r"HTTP 503.*gave up after 2 attempt"):
        fake((503, b"loading"), max_retries=1)
    port = free_port()                                                   # nothing listens there
    engine = OpenAICompatibleEngine(f"http://127.0.0.1:{port}", model="m", max_retries=1, backoff=0.01)
    t0 = time.monotonic()
    with pytest.raises(RolloutError, match=rf"http://127.0.0.1:{port}/v1/completions: .*(refused|reachable)"):
        engine.generate([[1, 2]], 1, SamplingConfig(max_new_tokens=2))
    assert time.monotonic() - t0 < 5


# ---- weight reloads -----------------------------------------------------------------------------
@pytest.mark.slow   # a fresh interpreter / server process
def test_reload_protocols_switch_weights(env, tmp_path):
    ref, a, b = env["ref"], env["a"], env["b"]
    sglang = OpenAICompatibleEngine(env["url"], reload="sglang")
    vllm = OpenAICompatibleEngine(env["url"], reload="vllm")
    custom = OpenAICompatibleEngine(env["url"], reload="endpoint", reload_endpoint="/update_weights_from_disk",
                                    reload_body={"model_path": "{model_path}", "weight_version": "{iteration}"})
    try:
        before = _assert_serves(sglang, ref, a)
        sglang.load_folder(b, iteration=5)
        after = _assert_serves(sglang, ref, b)
        assert [r.log_probs for r in after] != [r.log_probs for r in before]
        vllm.load_folder(a)
        _assert_serves(vllm, ref, a)
        custom.load_folder(b, iteration=6)
        _assert_serves(custom, ref, b)
        info = json.loads(urllib.request.urlopen(env["url"] + "/get_model_info").read())
        assert info["weight_version"] == "6"
        # an endpoint that does not load anything: the /v1/models check catches it
        noop = OpenAICompatibleEngine(env["url"], reload="endpoint", reload_endpoint="/reset_prefix_cache")
        with pytest.raises(RolloutError, match=rf"GET {env['url']}/v1/models lists .*expected {a}"):
            noop.load_folder(a)
        with pytest.raises(RolloutError, match="update_weights_from_disk: HTTP 400.*no config.json"):
            sglang.load_folder(str(tmp_path))
    finally:
        sglang.load_folder(a)


@pytest.mark.slow   # a fresh interpreter / server process
def test_sync_weights_from_megatron_checkpoint(env, tmp_path):
    ckpt, sync_dir = str(tmp_path / "ckpt"), str(tmp_path / "sync")
    subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py"), "import", "--hf-dir",
                    env["a"], "--save", ckpt, "--no-progress"], check=True, capture_output=True)
    engine = OpenAICompatibleEngine(env["url"], reload="sglang", sync_dir=sync_dir, export_dtype="fp32")
    engine.load_folder(env["b"])             # the server starts on other weights
    try:
        with pytest.raises(RolloutError, match="needs checkpoint_dir"):
            engine.sync_weights(0)
        with pytest.raises(RolloutError, match=r"exporting .*missing.* failed"):
            engine.sync_weights(0, str(tmp_path / "missing"))
        t0 = time.monotonic()
        engine.sync_weights(0, ckpt)
        took = time.monotonic() - t0
        folder = os.path.join(sync_dir, "hf")                # the rolling HF folder
        assert engine.served_path == folder and engine.synced_iteration == 0
        assert sorted(os.listdir(sync_dir)) == ["hf"]        # no .new / .prev / .tmp left
        info = json.loads(urllib.request.urlopen(env["url"] + "/get_model_info").read())
        assert info["model_path"] == folder and info["weight_version"] == "0"
        _assert_serves(engine, env["ref"], env["a"])       # the original weights, through Megatron and back
        assert engine.last_sync["export_bytes"] > 0 and "weights_bytes" not in engine.last_sync
        engine.sync_weights(0, ckpt)                        # same iteration: nothing to do
        print(f"sync_weights (export + reload) of the tiny model: {took:.1f} s")
    finally:
        engine.load_folder(env["a"])


@pytest.mark.slow   # a fresh interpreter / server process
def test_restart_protocol(env):
    port = free_port()
    cmd = [sys.executable, SERVER, "--model", "{model_path}", "--port", str(port), "--threads", "1"]
    engine = OpenAICompatibleEngine(f"http://127.0.0.1:{port}", reload="restart", restart_command=cmd,
                                    sync_dir=str(env["root"] / "restart"), startup_timeout=90)
    try:
        engine.load_folder(env["b"])
        _assert_serves(engine, env["ref"], env["b"])
        first = engine.server.proc
        engine.load_folder(env["a"])
        assert first.poll() is not None                     # the old server was stopped
        _assert_serves(engine, env["ref"], env["a"])
    finally:
        engine.close()
    assert first.poll() is not None and engine.server.proc is None
    bad = OpenAICompatibleEngine(f"http://127.0.0.1:{port}", reload="restart", startup_timeout=30,
                                 restart_command=[sys.executable, "-c", "import sys; sys.exit('no model at {model_path}')"],
                                 sync_dir=str(env["root"] / "restart"))
    with pytest.raises(RolloutError, match=r"(?s)exited with 1 before .*/health answered; log .*:\n+no model at /nowhere$"):
        bad.load_folder("/nowhere")


def test_constructor_validation():
    with pytest.raises(ValueError, match="http"):
        OpenAICompatibleEngine("localhost:8000")
    with pytest.raises(ValueError, match="reload"):
        OpenAICompatibleEngine("http://x", reload="magic")
    with pytest.raises(ValueError, match="restart_command"):
        OpenAICompatibleEngine("http://x", reload="restart")
    with pytest.raises(ValueError, match="reload_endpoint"):
        OpenAICompatibleEngine("http://x", reload="endpoint")
    assert OpenAICompatibleEngine("http://x:1/v1/").url == "http://x:1"
    with pytest.raises(ValueError, match="logprobs"):
        OpenAICompatibleEngine("http://x", logprobs="processed")
    with pytest.raises(ValueError, match="weights_writer needs sync_dir"):
        OpenAICompatibleEngine("http://x", weights_writer=lambda root, it: None)


# ---- the collective contract of sync_weights ------------------------------------------------------
class _CountingEngine(OpenAICompatibleEngine):
    """Exports by writing a stub folder (the real export is tested above) and counts the calls; at each
    reload it records what the sync folder holds (the publication order)."""

    def export(self, checkpoint_dir, iteration, folder):
        if checkpoint_dir == "fail":
            raise RolloutError("export failed on purpose")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump({"iteration": iteration}, f)
        self.exports = getattr(self, "exports", 0) + 1

    def load_folder(self, folder, iteration=None):
        def version(name):
            path = os.path.join(self.sync_dir, name, "config.json")
            return json.load(open(path))["iteration"] if os.path.isfile(path) else None
        self.seen = getattr(self, "seen", []) + [(os.path.basename(folder), version("hf"), version("hf.prev"),
                                                  os.path.exists(os.path.join(self.sync_dir, "hf.new")))]
        if iteration == 13:
            raise RolloutError("reload failed on purpose")
        super().load_folder(folder, iteration)


def _writer(root, iteration):
    """A stand-in for training.checkpointing.save_weights: one rank-specific file per call."""
    import torch.distributed as dist
    folder = os.path.join(root, f"iter_{iteration:07d}")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"rank{dist.get_rank()}.bin"), "wb") as f:
        f.write(b"x" * 1000)
    dist.barrier()


def _sync_on_rank(rank, world, sync_dir):
    engine = _CountingEngine("http://127.0.0.1:9", sync_dir=sync_dir, reload="none")
    engine.sync_weights(3, "ckpt")
    try:
        engine.sync_weights(4, "fail")
        failed = None
    except RolloutError as e:
        failed = str(e)
    writing = _CountingEngine("http://127.0.0.1:9", sync_dir=sync_dir, reload="none", weights_writer=_writer)
    writing.sync_weights(5)
    writing.sync_weights(5)                                  # served already: no write, no export
    writing.sync_weights(6)
    return (getattr(engine, "exports", 0), engine.synced_iteration, failed, getattr(writing, "exports", 0),
            writing.last_sync, getattr(writing, "seen", None))


def test_sync_weights_is_collective(tmp_path):
    from tests.dist_harness import run_ranks
    results = run_ranks(_sync_on_rank, 2, str(tmp_path))
    assert [r[0] for r in results] == [1, 0]                 # only rank 0 exports
    assert [r[1] for r in results] == [3, 3]                 # every rank knows the synced iteration
    for _, _, failed, *_ in results:                         # rank 0's failure reaches every rank
        assert failed and "failed on rank 0" in failed and "export failed on purpose" in failed
    assert [r[3] for r in results] == [2, 0]
    for r in results:                                        # every rank has the numbers of the last sync
        stats = r[4]
        assert stats["iteration"] == 6 and stats["weights_bytes"] == 2000 and stats["export_bytes"] > 0
        assert all(stats[k] >= 0 for k in ("weights_s", "export_s", "reload_s", "total_s"))
    # At each reload the new weights are under the served name, the previous ones under hf.prev
    assert results[0][5] == [("hf", 5, 3, False), ("hf", 6, 5, False)]
    assert sorted(os.listdir(tmp_path)) == ["hf", "weights"]   # hf.prev deleted after the reload succeeded


def test_failed_reload_keeps_the_previous_folder(tmp_path):
    engine = _CountingEngine("http://127.0.0.1:9", sync_dir=str(tmp_path), reload="none")
    engine.sync_weights(12, "ckpt")
    with pytest.raises(RolloutError, match="reload failed on purpose"):
        engine.sync_weights(13, "ckpt")
    assert engine.synced_iteration == 12
    # the new folder is published, the one the server last loaded is still there (it may still use it)
    assert json.load(open(tmp_path / "hf" / "config.json"))["iteration"] == 13
    assert json.load(open(tmp_path / "hf.prev" / "config.json"))["iteration"] == 12
    engine.sync_weights(14, "ckpt")                           # the next sync replaces it
    assert sorted(os.listdir(tmp_path)) == ["hf"]
    assert engine.seen[-1] == ("hf", 14, 13, False)
