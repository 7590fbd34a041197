"""The HTTP side of the external rollout engine: one OpenAI-compatible server's API.

`Client` sends JSON requests to the server (connection errors, timeouts and HTTP 429/502/503/504
retried with exponential backoff; a RolloutError naming the URL otherwise), finds the served model
(GET /v1/models), checks which folder it serves, and turns one prompt into one `/v1/completions`
request and its answer into `Rollout`s (`complete`, `parse_choice`).

Request (one per prompt): `prompt` = token ids, `n`, `max_tokens`, `temperature`, `top_p`, `top_k`
(vLLM/SGLang extension; -1 = off), `seed`, `logprobs=1` (the sampled token's log-prob always comes
back in `token_logprobs`), `return_tokens_as_token_ids` (vLLM: `logprobs.tokens` are "token_id:N",
so ids survive detokenization) and `return_token_ids` (newer vLLM: `choices[i].token_ids`),
`stop_token_ids` (the EOD id when `stop_at_eod`) and `ignore_eos` (when not). finish_reason "stop"
-> finished. Sampling-parameter defaults that a server takes from the model's generation_config.json
(vLLM's `--generation-config auto`: repetition penalty, min-p, ...) are overridden by explicit
neutral values in every request. The log-probs are passed through as the server reports them (what
they must be: the package docstring).
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request
from typing import Any, Optional, Sequence

from megatron_rpt.inference.base import Rollout, RolloutError, SamplingConfig

_RETRY_STATUS = {429, 502, 503, 504}


class HTTPStatusError(RolloutError):
    """The server answered with an HTTP error status (`status`)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class Client:
    """Requests to the server at `url` (a trailing "/" or "/v1" is dropped); the arguments are those
    of `OpenAICompatibleEngine` of the same names, checked there."""

    def __init__(self, url: str, *, model: Optional[str] = None, eod_token_id: Optional[int] = None,
                 request_timeout: float = 600.0, max_retries: int = 3, backoff: float = 1.0,
                 api_key: Optional[str] = None, extra_body: Optional[dict] = None):
        url = url.rstrip("/")
        self.url = url[: -len("/v1")] if url.endswith("/v1") else url
        self.model = model
        self._fixed_model = model is not None
        self.eod_token_id = eod_token_id
        self.request_timeout = request_timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.api_key = api_key
        self.extra_body = dict(extra_body or {})

    def _endpoint(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else self.url + path

    def request(self, method: str, path: str, body: Optional[dict] = None, *, timeout: Optional[float] = None,
                retries: Optional[int] = None, expect_json: bool = True) -> Any:
        """One HTTP call with retries on transient failures; RolloutError naming the URL otherwise."""
        url = self._endpoint(path)
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        retries = self.max_retries if retries is None else retries
        timeout = self.request_timeout if timeout is None else timeout
        last: Optional[BaseException] = None
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            req = urllib.request.Request(url, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(req, timeout=timeout) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as e:
                detail = excerpt(e.read())
                err = HTTPStatusError(f"{method} {url}: HTTP {e.code} {e.reason}: {detail}", e.code)
                if e.code in _RETRY_STATUS:
                    last = err
                    continue
                raise err from None
            except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError) as e:
                reason = getattr(e, "reason", e)
                last = RolloutError(f"{method} {url}: {type(reason).__name__}: {reason} "
                                    f"(is the server running and reachable?)")
                continue
            if not expect_json:
                return raw
            try:
                return json.loads(raw)
            except json.JSONDecodeError as e:
                raise RolloutError(f"{method} {url}: response is not JSON ({e}): {excerpt(raw)}") from None
        raise RolloutError(f"{last} [gave up after {retries + 1} attempt(s)]")

    # ---- the served model ---------------------------------------------------------------------
    def served_models(self) -> list[dict]:
        """GET /v1/models: the `data` list."""
        resp = self.request("GET", "/v1/models")
        data = resp.get("data") if isinstance(resp, dict) else None
        if not isinstance(data, list):
            raise RolloutError(f"GET {self.url}/v1/models: no `data` list in the response: {excerpt(resp)}")
        return data

    def model_name(self) -> str:
        """The `model` field sent: the one given, else the first model GET /v1/models lists."""
        if self.model is None:
            models = self.served_models()
            if not models or not isinstance(models[0], dict) or "id" not in models[0]:
                raise RolloutError(f"GET {self.url}/v1/models: the server lists no model")
            self.model = str(models[0]["id"])
        return self.model

    def forget_model(self) -> None:
        """After a reload: the served name may have changed (looked up again on next use, unless given)."""
        if not self._fixed_model:
            self.model = None

    def check_models(self, folder: str) -> None:
        """RolloutError unless GET /v1/models names `folder` (as a model's `root` or `id`)."""
        models = self.served_models()
        names = [(m.get("root"), m.get("id")) for m in models if isinstance(m, dict)]
        if not any(same_path(root, folder) or same_path(mid, folder) for root, mid in names):
            raise RolloutError(f"after reloading, GET {self.url}/v1/models lists {names} (root, id); expected "
                               f"{folder}")

    # ---- completions --------------------------------------------------------------------------
    def _body(self, prompt: Sequence[int], n: int, s: SamplingConfig, seed: int) -> dict:
        body = {"model": self.model_name(), "prompt": [int(t) for t in prompt], "n": n,
                "max_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p,
                "top_k": s.top_k if s.top_k > 0 else -1, "seed": seed, "logprobs": 1,
                "return_tokens_as_token_ids": True, "return_token_ids": True, "stream": False,
                "echo": False,
                # explicit, or vLLM applies the model's generation_config.json defaults (--generation-config auto)
                "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "min_p": 0.0}
        if s.stop_at_eod:
            if self.eod_token_id is not None:
                body["stop_token_ids"] = [int(self.eod_token_id)]
        else:
            body["ignore_eos"] = True
        body.update(self.extra_body)
        return body

    def complete(self, prompt: Sequence[int], n: int, s: SamplingConfig, seed: int) -> list[Rollout]:
        """One POST /v1/completions: the `n` responses to `prompt`, in the order of their `index`."""
        url = f"{self.url}/v1/completions"
        resp = self.request("POST", "/v1/completions", self._body(prompt, n, s, seed))
        choices = resp.get("choices") if isinstance(resp, dict) else None
        if not isinstance(choices, list):
            raise RolloutError(f"POST {url}: no `choices` list in the response: {excerpt(resp)}")
        if len(choices) != n:
            raise RolloutError(f"POST {url}: asked for n={n} responses, got {len(choices)}")
        by_index: dict[int, Rollout] = {}
        for pos, c in enumerate(choices):
            idx = c.get("index", pos) if isinstance(c, dict) else pos
            if not isinstance(c, dict) or not isinstance(idx, int) or not 0 <= idx < n or idx in by_index:
                raise RolloutError(f"POST {url}: choice {pos} is malformed or has a bad/duplicate index: "
                                   f"{excerpt(c)}")
            by_index[idx] = parse_choice(c, url, idx, s.max_new_tokens)
        return [by_index[j] for j in range(n)]


def parse_choice(c: dict, url: str, idx: int, max_tokens: int) -> Rollout:
    """One completions `choice` as a Rollout; RolloutError naming `url` and `idx` when malformed."""
    where = f"POST {url}: choice {idx}"
    lp = c.get("logprobs")
    if not isinstance(lp, dict) or not isinstance(lp.get("token_logprobs"), list):
        raise RolloutError(f"{where} has no logprobs.token_logprobs (does the server support `logprobs`?): "
                           f"{excerpt(c)}")
    log_probs = lp["token_logprobs"]
    tokens = c.get("token_ids")
    if tokens is None:
        names = lp.get("tokens")
        if not isinstance(names, list):
            raise RolloutError(f"{where} has neither token_ids nor logprobs.tokens: {excerpt(c)}")
        try:
            tokens = [int(str(t).rsplit("token_id:", 1)[1]) for t in names]
        except (IndexError, ValueError):
            raise RolloutError(f"{where}: logprobs.tokens are not 'token_id:N' (a vLLM server needs "
                               f"return_tokens_as_token_ids; this server ignored it): {excerpt(names[:4])}") from None
    if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
        raise RolloutError(f"{where}: token_ids is not a list of integers: {excerpt(tokens)}")
    if len(tokens) != len(log_probs):
        raise RolloutError(f"{where}: {len(tokens)} tokens but {len(log_probs)} log-probs")
    if any(not isinstance(x, (int, float)) or isinstance(x, bool) for x in log_probs):
        raise RolloutError(f"{where}: missing (null) or non-numeric log-probs: {excerpt(log_probs)}")
    if len(tokens) > max_tokens:
        raise RolloutError(f"{where}: {len(tokens)} tokens for max_tokens={max_tokens}")
    reason = c.get("finish_reason")
    if reason not in ("stop", "length"):
        raise RolloutError(f"{where}: finish_reason {reason!r} (expected 'stop' or 'length')")
    text = c.get("text")
    return Rollout(tokens=list(tokens), log_probs=[float(x) for x in log_probs],
                   text=text if isinstance(text, str) else "", finished=reason == "stop",
                   extra={"finish_reason": reason, "stop_reason": c.get("stop_reason")})


def excerpt(obj: Any, limit: int = 300) -> str:
    """`obj` (bytes, text or JSON) on one line, cut at `limit` characters: for error messages."""
    if isinstance(obj, bytes):
        text = obj.decode("utf-8", "replace")
    elif isinstance(obj, str):
        text = obj
    else:
        try:
            text = json.dumps(obj)
        except (TypeError, ValueError):
            text = repr(obj)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def same_path(a: Any, b: Optional[str]) -> bool:
    """Whether the path a server reports (`a`, any JSON value) is the folder `b`."""
    if not isinstance(a, str) or b is None:
        return False
    return os.path.realpath(a.rstrip("/")) == os.path.realpath(b.rstrip("/"))
