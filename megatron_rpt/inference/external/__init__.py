"""The external rollout engine: an OpenAI-compatible completions server (vLLM, SGLang) over HTTP.

`OpenAICompatibleEngine` turns `generate(prompts, n, sampling)` into `/v1/completions` requests and
keeps the server on the trainer's weights (`sync_weights`). Its parts, one module each:

  client.py       `Client`: HTTP requests with retries, the served model, the completions request
                  and the parsing of its answer into `Rollout`s.
  engine.py       `OpenAICompatibleEngine`: argument checks, concurrent requests, the collective
                  `generate` per model-parallel group; holds a Client, a WeightSync and a
                  ServerProcess and delegates to them.
  collective.py   the group of ranks that shares one conversation with the server, the broadcast.
  weight_sync.py  `WeightSync`: model-only weights -> <sync_dir>/hf.new (HF export in a child
                  process) -> published as <sync_dir>/hf -> reloaded by the server (none, sglang,
                  vllm, endpoint, restart), with a line of bytes and seconds.
  server.py       `ServerProcess`: the server process the engine (re)starts for reload="restart";
                  the children's environment without the launcher's rank variables.

Log-probs: base.py's convention is log softmax(z / T)[token], T the sampling temperature, over the
full vocabulary (top-k/top-p truncation is not part of it, as in verl). The engine passes the
server's values through, so the server must report them that way; `logprobs` says what it reports:

  "tempered" (default)  at the sampling temperature.
      vLLM:   vllm serve HF_DIR --logprobs-mode processed_logprobs --max-logprobs 1
              processed_logprobs is log_softmax of the logits after penalties, temperature, min-p AND
              top-k/top-p (vllm/v1/sample/sampler.py + ops/topk_topp_sampler.py: the kept set is
              renormalised, the rest is -inf). Exact for the convention only without top-k/top-p
              (--rpt-top-p 1 --rpt-top-k 0); with them, validate_rpt_config refuses the runs whose
              update uses the engine's log-probs (--rpt-use-rollout-logprobs, --rpt-tis-cap).
              Requests carry neutral penalties and min_p 0 (client.py), so nothing else enters.
      SGLang: its default (no SGLANG_RETURN_ORIGINAL_LOGPROB): current sampler.py reports
              log(softmax(z / T)) over the full vocabulary, before top-k/top-p (some early-2025
              releases renormalised over the top-p set: check yours against a reference once).
  "raw"  at temperature 1: vLLM --logprobs-mode raw_logprobs (its default since the option exists,
      vLLM PR #21398), SGLang with SGLANG_RETURN_ORIGINAL_LOGPROB=1 (SGLang PR #8375). They equal the
      convention only at temperature 1: log softmax(z / T) cannot be rebuilt from one raw log-prob
      (it needs the whole distribution), so `generate` refuses raw at temperature != 1 and so does
      validate_rpt_config (--rollout-logprobs raw with --rpt-temperature != 1).

The engine cannot check any of this from a response: the tests' small HF server (either mode) and
the tests compare with transformers' log_softmax. Launch lines, e.g.:

    vllm serve HF_DIR --logprobs-mode processed_logprobs --max-logprobs 1 --port 8000
        [--served-model-name policy]   # VLLM_SERVER_DEV_MODE=1 for reload="vllm"
    python -m sglang.launch_server --model-path HF_DIR --port 8000
"""

from megatron_rpt.inference.external.engine import LOGPROBS_MODES, OpenAICompatibleEngine
from megatron_rpt.inference.external.weight_sync import RELOAD_PROTOCOLS

__all__ = ["LOGPROBS_MODES", "OpenAICompatibleEngine", "RELOAD_PROTOCOLS"]
