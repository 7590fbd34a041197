#!/usr/bin/env python
"""A small OpenAI-compatible completions server for Hugging Face causal LMs (transformers, CPU or GPU).

A test fixture, not a product tool: the external rollout engine's (`megatron_rpt.inference.external`)
tests run against it where vLLM or SGLang are not installed. It serves one model at a time, one request at a time
(requests are queued behind a lock), with the request/response fields of vLLM's server that the
engine uses:

  POST /v1/completions   prompt: token ids (list[int]) or text (needs a tokenizer in the folder);
                         n, max_tokens, temperature (0: greedy), top_p, top_k (-1/0: off), seed,
                         logprobs (int: the sampled token's log-prob is always returned, plus that
                         many top alternatives), return_tokens_as_token_ids ("token_id:N" tokens),
                         return_token_ids (choices carry `token_ids`), stop_token_ids, ignore_eos.
                         finish_reason: "stop" (EOS / a stop token, included in the output) or
                         "length" (max_tokens reached).
  GET  /v1/models        the served model; `root` is the folder its weights came from.
  GET  /health           200 once a model is loaded.
  Weight reload from disk, in both servers' dialects:
  POST /update_weights_from_disk {"model_path": DIR, "weight_version": V}   (SGLang's)
  GET  /get_model_info   {"model_path": DIR, "weight_version": V}          (SGLang's)
  POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path": DIR}}  (vLLM dev mode's)
  POST /reset_prefix_cache                                                  (vLLM's; no cache here)

Log-probs (`--logprobs-mode`), over the full vocabulary whatever top-p/top-k truncated:
  tempered (default)  log_softmax(logits / temperature), at the sampling temperature (the convention
                      of megatron_rpt.inference.base; SGLang's default; vLLM's processed_logprobs
                      without top-k/top-p);
  raw                 log_softmax(logits), temperature 1 (vLLM's raw_logprobs, SGLang with
                      SGLANG_RETURN_ORIGINAL_LOGPROB=1).
Temperature 0 (greedy) reports temperature 1 in both. A request may override the mode with the
field `logprobs_mode` (this server's extension, for tests).

  python tests/serve_hf_openai.py --model HF_DIR [--port 8000] [--served-model-name NAME] [--dtype fp32]
                                  [--logprobs-mode tempered|raw]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

import torch

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LOGPROBS_MODES = ("tempered", "raw")


class BadRequest(ValueError):
    """A client error: answered with HTTP 400 and the message."""


class ModelHost:
    """The served model, swapped atomically by a reload."""

    def __init__(self, path: str, served_name: Optional[str], dtype: torch.dtype, device: str,
                 logprobs_mode: str = "tempered"):
        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode {logprobs_mode!r} must be one of {', '.join(LOGPROBS_MODES)}")
        self.dtype, self.device = dtype, device
        self.logprobs_mode = logprobs_mode
        self.served_name = served_name
        self.lock = threading.Lock()
        self.weight_version: Optional[str] = None
        self.load(path)

    def load(self, path: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise BadRequest(f"{path}: no config.json (not a Hugging Face model folder)")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype).to(self.device).eval()
        tokenizer = None
        if any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
            try:
                tokenizer = AutoTokenizer.from_pretrained(path)
            except Exception as e:  # a broken tokenizer should not stop token-id serving
                print(f"serve_hf_openai: no tokenizer from {path} ({e}); responses have empty text",
                      file=sys.stderr)
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = model.config.eos_token_id
        eos_ids = set(eos if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos]))
        with self.lock:
            self.model, self.tokenizer, self.eos_ids = model, tokenizer, eos_ids
            self.path = os.path.abspath(path)
            self.max_len = getattr(model.config, "max_position_embeddings", None)
        print(f"serve_hf_openai: serving {self.path}", file=sys.stderr, flush=True)

    @property
    def name(self) -> str:
        return self.served_name or self.path

    # ---- generation -------------------------------------------------------------------------
    def complete(self, req: dict) -> dict:
        prompt = req.get("prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
            prompts = prompt
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            prompts = [prompt]
        elif isinstance(prompt, str):
            if self.tokenizer is None:
                raise BadRequest("text prompts need a tokenizer in the model folder; send token ids")
            prompts = [self.tokenizer(prompt)["input_ids"]]
        else:
            raise BadRequest("prompt must be a string, a list of token ids or a list of such lists")
        model_name = req.get("model")
        if model_name not in (None, self.name):
            raise BadRequest(f"model {model_name!r} is not served here (serving {self.name!r})")
        n = _int(req, "n", 1, lo=1)
        max_tokens = _int(req, "max_tokens", 16, lo=1)
        temperature = float(req.get("temperature", 1.0) if req.get("temperature") is not None else 1.0)
        top_p = float(req.get("top_p", 1.0) if req.get("top_p") is not None else 1.0)
        top_k = _int(req, "top_k", -1)
        if temperature < 0 or not 0 < top_p <= 1:
            raise BadRequest("temperature must be >= 0 and top_p in (0, 1]")
        logprobs = req.get("logprobs")
        mode = req.get("logprobs_mode") or self.logprobs_mode
        if mode not in LOGPROBS_MODES:
            raise BadRequest(f"logprobs_mode must be one of {', '.join(LOGPROBS_MODES)}, got {mode!r}")
        seed = req.get("seed")
        stop_ids = set(req.get("stop_token_ids") or [])
        if not req.get("ignore_eos", False):
            stop_ids |= self.eos_ids
        as_ids = bool(req.get("return_tokens_as_token_ids", False))
        choices, usage_out, usage_in = [], 0, 0
        with self.lock:
            for i, p in enumerate(prompts):
                vocab = self.model.config.vocab_size
                if not p or any(not isinstance(t, int) or not 0 <= t < vocab for t in p):
                    raise BadRequest(f"prompt {i}: token ids must be integers in [0, {vocab})")
                if self.max_len is not None and len(p) + max_tokens > self.max_len:
                    raise BadRequest(f"prompt {i}: {len(p)} prompt tokens + max_tokens {max_tokens} exceed the "
                                     f"model's context length {self.max_len}")
                gen = torch.Generator(device=self.device)
                gen.manual_seed(int(seed) + i if seed is not None else int.from_bytes(os.urandom(4), "little"))
                outs = self._sample(p, n, max_tokens, temperature, top_p, top_k, stop_ids, gen, mode)
                usage_in += len(p)
                for j, (tokens, lps, finished) in enumerate(outs):
                    usage_out += len(tokens)
                    choices.append(self._choice(i * n + j, tokens, lps, finished, logprobs, as_ids, req))
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.name, "choices": choices,
                "usage": {"prompt_tokens": usage_in, "completion_tokens": usage_out,
                          "total_tokens": usage_in + usage_out}}

    @torch.no_grad()
    def _sample(self, prompt, n, max_tokens, temperature, top_p, top_k, stop_ids, gen, mode):
        ids = torch.tensor([prompt] * n, dtype=torch.long, device=self.device)
        past, step_in = None, ids
        tokens = [[] for _ in range(n)]
        lps = [[] for _ in range(n)]
        done = [False] * n
        for _ in range(max_tokens):
            out = self.model(input_ids=step_in, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[:, -1, :].float()
            greedy = temperature < 1e-5     # vLLM's convention: temperature 0 is greedy
            reported = torch.log_softmax(logits if greedy or mode == "raw" else logits / temperature, dim=-1)
            if greedy:
                nxt = logits.argmax(dim=-1)
            else:
                nxt = torch.multinomial(torch.softmax(_filter(logits / temperature, top_p, top_k), dim=-1), 1,
                                        generator=gen).squeeze(-1)
            for r in range(n):
                if done[r]:
                    continue
                t = int(nxt[r])
                tokens[r].append(t)
                lps[r].append(float(reported[r, t]))
                if t in stop_ids:
                    done[r] = True
            if all(done):
                break
            step_in = nxt.unsqueeze(-1)
        return [(tokens[r], lps[r], done[r]) for r in range(n)]

    def _choice(self, index, tokens, lps, finished, logprobs, as_ids, req) -> dict:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True) if self.tokenizer is not None else ""
        choice: dict[str, Any] = {"index": index, "text": text, "finish_reason": "stop" if finished else "length",
                                  "stop_reason": None}
        if req.get("return_token_ids"):
            choice["token_ids"] = tokens
        if logprobs is not None:
            def name(t: int) -> str:
                if as_ids or self.tokenizer is None:
                    return f"token_id:{t}"
                return self.tokenizer.decode([t])
            choice["logprobs"] = {"tokens": [name(t) for t in tokens], "token_logprobs": lps,
                                  "top_logprobs": [{name(t): lp} for t, lp in zip(tokens, lps)],
                                  "text_offset": [0] * len(tokens)}
        else:
            choice["logprobs"] = None
        return choice


def _int(req: dict, key: str, default: int, lo: Optional[int] = None) -> int:
    value = req.get(key, default)
    if value is None:
        value = default
    if not isinstance(value, int) or isinstance(value, bool) or (lo is not None and value < lo):
        raise BadRequest(f"{key} must be an integer{f' >= {lo}' if lo is not None else ''}, got {value!r}")
    return value


def _filter(logits: torch.Tensor, top_p: float, top_k: int) -> torch.Tensor:
    """Top-k, then top-p (nucleus) filtering of temperature-scaled logits (rows independent)."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs        # mass of strictly more likely tokens
        remove_sorted = before >= top_p                     # the first token is always kept
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


class Handler(BaseHTTPRequestHandler):
    host: ModelHost
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet: one line per error only
        pass

    def _send(self, status: int, payload: Any) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b"{}"
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError as e:
            raise BadRequest(f"request body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        return body

    def do_GET(self):
        h = self.host
        if self.path == "/health":
            self._send(200, {})
        elif self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": h.name, "object": "model", "created": 0,
                                                         "owned_by": "serve_hf_openai", "root": h.path,
                                                         "max_model_len": h.max_len}]})
        elif self.path == "/get_model_info":
            self._send(200, {"model_path": h.path, "is_generation": True, "weight_version": h.weight_version})
        else:
            self._send(404, {"error": {"message": f"no route GET {self.path}", "code": 404}})

    def do_POST(self):
        h = self.host
        try:
            body = self._body()
            if self.path == "/v1/completions":
                if body.get("stream"):
                    raise BadRequest("stream is not supported by this server")
                self._send(200, h.complete(body))
            elif self.path == "/update_weights_from_disk":
                path = body.get("model_path")
                if not isinstance(path, str):
                    raise BadRequest("model_path (a folder) is required")
                try:
                    h.load(path)
                except Exception as e:
                    self._send(400, {"success": False, "message": f"failed to load {path}: {e}",
                                     "num_paused_requests": 0})
                    return
                h.weight_version = body.get("weight_version")
                self._send(200, {"success": True, "message": f"loaded {h.path}", "num_paused_requests": 0})
            elif self.path == "/collective_rpc":
                if body.get("method") != "reload_weights":
                    raise BadRequest(f"collective_rpc method {body.get('method')!r} is not supported here "
                                     "(only reload_weights)")
                path = (body.get("kwargs") or {}).get("weights_path")
                if not isinstance(path, str):
                    raise BadRequest("kwargs.weights_path (a folder) is required")
                h.load(path)
                self._send(200, {"results": [None]})
            elif self.path == "/reset_prefix_cache":
                self._send(200, {})
            else:
                self._send(404, {"error": {"message": f"no route POST {self.path}", "code": 404}})
        except BadRequest as e:
            self._send(400, {"error": {"message": str(e), "type": "BadRequestError", "code": 400}})
        except Exception as e:  # report, keep serving
            print(f"serve_hf_openai: {self.path}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            self._send(500, {"error": {"message": f"{type(e).__name__}: {e}", "code": 500}})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--model", required=True, help="Hugging Face model folder (config.json + safetensors)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--served-model-name", default=None, help="name clients send as `model` (default: the folder)")
    ap.add_argument("--dtype", default="fp32", choices=list(_DTYPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--logprobs-mode", default="tempered", choices=LOGPROBS_MODES,
                    help="reported log-probs: at the sampling temperature (tempered) or at temperature 1 (raw)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    Handler.host = ModelHost(args.model, args.served_model_name, _DTYPES[args.dtype], args.device,
                             args.logprobs_mode)
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    print(f"serve_hf_openai: listening on http://{args.host}:{server.server_address[1]}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
