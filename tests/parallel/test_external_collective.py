"""The external rollout engine's collective `generate` on forked gloo ranks.

A stdlib fake OpenAI server in a thread of the pytest process answers every request differently (a
global counter in the tokens), as a real server that is not batch-invariant may: two ranks asking
for the same prompt would get different rollouts. With TP=2 (Megatron-Core's model-parallel group)
and with CP=2 (a TP x CP x PP group the engine creates), only the group's first rank may talk to the
server and both ranks must receive its rollouts; at DP=2 every rank talks for its own prompts. A
server error on the talking rank must reach both ranks as a RolloutError (no hang).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.dist_harness import run_ranks

PROMPTS = [[1, 2, 3], [4, 5]]


class _Counter(BaseHTTPRequestHandler):
    calls = 0
    fail = False
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        cls = type(self)
        with cls.lock:
            cls.calls += 1
            call = cls.calls
        if cls.fail:
            payload, status = b'{"error": {"message": "engine crashed"}}', 500
        else:
            choices = [{"index": j, "text": "", "finish_reason": "length", "token_ids": [call, j],
                        "logprobs": {"token_logprobs": [-0.1 * call, -0.5]}} for j in range(body["n"])]
            payload, status = json.dumps({"choices": choices}).encode(), 200
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture()
def server():
    _Counter.calls, _Counter.fail = 0, False
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Counter)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _generate(rank, world, url, layout):
    from megatron.core import parallel_state as ps

    from megatron_rpt.inference.base import SamplingConfig
    from megatron_rpt.inference.external import OpenAICompatibleEngine

    ps.initialize_model_parallel(**layout)
    engine = OpenAICompatibleEngine(url, model="m", max_retries=0)
    out = engine.generate(PROMPTS, 2, SamplingConfig(max_new_tokens=2, temperature=0.8, seed=1))
    engine.close()
    return [[(r.tokens, r.log_probs) for r in group] for group in out]


@pytest.mark.parametrize("layout", [{"tensor_model_parallel_size": 2}, {"context_parallel_size": 2}],
                         ids=["tp2", "cp2"])
def test_model_parallel_ranks_get_the_same_rollouts(server, layout):
    out0, out1 = run_ranks(_generate, 2, server, layout, timeout=120)
    assert out0 == out1                                   # the talking rank's rollouts, broadcast
    assert sorted(tuple(r[0]) for g in out0 for r in g) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert _Counter.calls == len(PROMPTS)                 # one request per prompt: rank 1 never asked


def test_data_parallel_ranks_talk_for_themselves(server):
    out0, out1 = run_ranks(_generate, 2, server, {}, timeout=120)
    assert out0 != out1                                   # DP=2: each rank its own requests
    assert _Counter.calls == 2 * len(PROMPTS)


def _failing(rank, world, url):
    from megatron.core import parallel_state as ps

    from megatron_rpt.inference.base import RolloutError, SamplingConfig
    from megatron_rpt.inference.external import OpenAICompatibleEngine

    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    engine = OpenAICompatibleEngine(url, model="m", max_retries=0)
    try:
        engine.generate(PROMPTS, 2, SamplingConfig(max_new_tokens=2))
    except RolloutError as e:
        return f"{type(e).__name__}: {e}"
    return None


def test_server_error_reaches_every_rank(server):
    _Counter.fail = True
    errors = run_ranks(_failing, 2, server, timeout=120)
    assert "HTTP 500" in errors[0] and "engine crashed" in errors[0]
    assert errors[1].startswith("RolloutError: rollouts failed on rank 0") and "engine crashed" in errors[1]
    assert _Counter.calls == len(PROMPTS)                 # rank 1 never asked
