"""The external rollout engine: an OpenAI-compatible completions server (vLLM, SGLang) over HTTP.

This module owns `OpenAICompatibleEngine`: turning `generate(prompts, n, sampling)` into
`/v1/completions` requests (token-id prompts, concurrent, retried), parsing the answers into
`Rollout`s, and the weight sync (trainer weights -> rolling HF folder -> the server reloads it).

Request (one per prompt, at most `max_inflight` in flight): `prompt` = token ids, `n`,
`max_tokens`, `temperature`, `top_p`, `top_k` (vLLM/SGLang extension; -1 = off), `seed`,
`logprobs=1` (the sampled token's log-prob always comes back in `token_logprobs`),
`return_tokens_as_token_ids` (vLLM: `logprobs.tokens` are "token_id:N", so ids survive
detokenization) and `return_token_ids` (newer vLLM: `choices[i].token_ids`), `stop_token_ids`
(the EOD id when `stop_at_eod`) and `ignore_eos` (when not). finish_reason "stop" -> finished.

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
              Requests carry neutral penalties and min_p 0 (below), so nothing else enters.
      SGLang: its default (no SGLANG_RETURN_ORIGINAL_LOGPROB): current sampler.py reports
              log(softmax(z / T)) over the full vocabulary, before top-k/top-p (some early-2025
              releases renormalised over the top-p set: check yours against a reference once).
  "raw"  at temperature 1: vLLM --logprobs-mode raw_logprobs (its default since the option exists,
      vLLM PR #21398), SGLang with SGLANG_RETURN_ORIGINAL_LOGPROB=1 (SGLang PR #8375). They equal the
      convention only at temperature 1: log softmax(z / T) cannot be rebuilt from one raw log-prob
      (it needs the whole distribution), so `generate` refuses raw at temperature != 1 and so does
      validate_rpt_config (--rollout-logprobs raw with --rpt-temperature != 1).

The engine cannot check any of this from a response: the tests' small HF server (either mode) and
the tests compare with transformers' log_softmax. Sampling-parameter defaults that a server takes
from the model's generation_config.json (vLLM's `--generation-config auto`: repetition penalty,
min-p, ...) are overridden by explicit neutral values in every request. Launch lines, e.g.:

    vllm serve HF_DIR --logprobs-mode processed_logprobs --max-logprobs 1 --port 8000
        [--served-model-name policy]   # VLLM_SERVER_DEV_MODE=1 for reload="vllm"
    python -m sglang.launch_server --model-path HF_DIR --port 8000

Weight sync (`sync_weights(iteration)`), model only, one rolling folder each, atomic:
1. every rank calls `weights_writer(<sync_dir>/weights, iteration)` (the RPT loop passes
   `training.checkpointing.save_weights`: a Megatron dist-checkpoint of the model's sharded state
   dict only, no optimizer or RNG state, written to a `.tmp` name and renamed; the previous one is
   then deleted). Without a writer, `sync_weights(iteration, checkpoint_dir)` exports an existing
   checkpoint folder instead (e.g. one from tools/convert_checkpoint.py).
2. rank 0 runs `megatron_rpt.convert.checkpoint.export_hf` in a child process (it creates and
   destroys its own 1-rank process group, so it cannot run inside the trainer's; the launcher's
   RANK/WORLD_SIZE/MASTER_*/SLURM_* are removed from the child's environment) into
   `<sync_dir>/hf.new`, a name the server never reads;
3. publication: the served `<sync_dir>/hf` is renamed to `hf.prev` and `hf.new` to `hf` (renames
   within one folder: the server never sees a torn `hf`; files it still holds open stay valid under
   `hf.prev`);
4. the server reloads `<sync_dir>/hf`, per `reload`; `hf.prev` is deleted once that succeeded (a
   failed reload leaves it, the next sync replaces it);
5. one line on rank 0: bytes and seconds of the weights write, the export and the reload.
The served path stays `<sync_dir>/hf`, so a check by path cannot tell old from new weights:

  "sglang"   POST /update_weights_from_disk {"model_path", "weight_version": iteration};
             checked with GET /get_model_info: model_path must be the folder, and weight_version,
             where the server reports one, the iteration.
  "vllm"     POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path",
             "is_checkpoint_format": true}} then POST /reset_prefix_cache (cached prefixes hold
             the old weights' KV). Needs the server started with VLLM_SERVER_DEV_MODE=1. vLLM's
             /v1/models keeps naming the launch folder, so the reload cannot be checked by name.
  "endpoint" POST `reload_endpoint` with `reload_body` ("{model_path}"/"{iteration}" substituted
             in its strings); checked with /v1/models (`root` or `id` must be the folder).
  "restart"  stop the server this engine started (if any), run `restart_command` with
             "{model_path}" substituted, wait for GET /health, check /v1/models as above.
  "none"     publish only (something else reloads the server; the RPT loop refuses it unless
             --rollout-frozen-policy, which syncs nothing at all).

Collective contract. `generate`: when torch.distributed and Megatron-Core's parallel_state are
initialised, the ranks that share a data-parallel rank (Megatron-Core's model-parallel group, TP x
PP; with context parallelism its TP x CP x PP ranks, a group this engine creates at construction)
must call it together with the same arguments. The group's first rank alone talks to the server
and broadcasts the rollouts (broadcast_object_list; on an NCCL group through the current CUDA
device), so every rank trains on the same sequences (servers are not batch-invariant: two
requests for one prompt may differ even with one seed); an error there is raised on every rank of
the group (a RolloutError naming that rank elsewhere). Groups of one rank skip the broadcast.
`sync_weights`: called by every rank of the job with the same arguments; the writer is collective,
rank 0 (of the default group) exports and reloads, an error on rank 0 is broadcast so that every
rank raises it. The construction is collective when context parallelism is on. Without a process
group the class is a plain single-process client.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Optional, Sequence, Union

from megatron_rpt.inference.base import Rollout, RolloutEngine, RolloutError, SamplingConfig

RELOAD_PROTOCOLS = ("none", "sglang", "vllm", "endpoint", "restart")
LOGPROBS_MODES = ("tempered", "raw")
_RETRY_STATUS = {429, 502, 503, 504}
# Variables by which a child would believe it is a rank of the trainer's job.
_LAUNCHER_PREFIXES = ("SLURM_", "TORCHELASTIC_", "PMI_", "OMPI_")
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                  "MASTER_ADDR", "MASTER_PORT", "NODE_RANK")


class _HTTPStatusError(RolloutError):
    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class OpenAICompatibleEngine(RolloutEngine):
    """Rollouts from an external OpenAI-compatible server (see the module docstring).

    Args:
        url: server base URL, e.g. "http://node7:8000" (a trailing "/v1" is accepted).
        model: the `model` field sent (the server's served model name); None: the first model
            GET /v1/models lists, looked up again after each reload.
        eod_token_id: the tokenizer's end-of-document id, sent as `stop_token_ids` when
            `sampling.stop_at_eod` (the server also stops at the model's own EOS unless
            `ignore_eos`, which is sent when not `stop_at_eod`).
        max_inflight: concurrent requests (one per prompt).
        request_timeout: seconds per HTTP request (a generation of n responses to one prompt).
        max_retries / backoff: connection errors, timeouts and HTTP 429/502/503/504 are retried
            up to max_retries times, sleeping backoff * 2**attempt seconds.
        api_key: sent as "Authorization: Bearer ..." when given.
        sync_dir: the weight sync's folder (<sync_dir>/weights: the rolling model-only checkpoint;
            <sync_dir>/hf: the HF folder the server loads); required for sync.
        reload: one of RELOAD_PROTOCOLS.
        reload_endpoint / reload_body: for reload="endpoint".
        restart_command: for reload="restart": a shell-style command line or argv list with
            "{model_path}" (e.g. "vllm serve {model_path} --port 8000 --logprobs-mode processed_logprobs").
        startup_timeout: seconds to wait for /health after a restart.
        export_dtype: "bf16" | "fp32" | "fp16" (the exported folder's dtype).
        export_timeout / reload_timeout: seconds for the export child process / the reload call.
        extra_body: more fields merged into every completions request (e.g. {"min_p": 0.0}).
        logprobs: one of LOGPROBS_MODES, what the server's log-probs are (module docstring).
        weights_writer: `writer(root, iteration)`, collective over all ranks: writes the trainer's
            weights as a model-only checkpoint under `root` (training.checkpointing.save_weights).
    """

    name = "openai"

    def __init__(self, url: str, *, model: Optional[str] = None, eod_token_id: Optional[int] = None,
                 max_inflight: int = 32, request_timeout: float = 600.0, max_retries: int = 3,
                 backoff: float = 1.0, api_key: Optional[str] = None, sync_dir: Optional[str] = None,
                 reload: str = "none", reload_endpoint: Optional[str] = None,
                 reload_body: Optional[dict] = None, restart_command: Union[str, Sequence[str], None] = None,
                 startup_timeout: float = 600.0, export_dtype: str = "bf16",
                 export_timeout: float = 3600.0, reload_timeout: float = 1800.0,
                 extra_body: Optional[dict] = None, logprobs: str = "tempered",
                 weights_writer: Optional[Callable[[str, int], Any]] = None):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"rollout url {url!r} must start with http:// or https://")
        url = url.rstrip("/")
        self.url = url[: -len("/v1")] if url.endswith("/v1") else url
        if reload not in RELOAD_PROTOCOLS:
            raise ValueError(f"reload {reload!r} must be one of {', '.join(RELOAD_PROTOCOLS)}")
        if reload == "endpoint" and not reload_endpoint:
            raise ValueError('reload="endpoint" needs reload_endpoint (a path like "/my_reload" or a URL)')
        if reload == "restart" and not restart_command:
            raise ValueError('reload="restart" needs restart_command (with "{model_path}")')
        if export_dtype not in ("bf16", "fp32", "fp16"):
            raise ValueError(f"export_dtype {export_dtype!r} must be bf16, fp32 or fp16")
        if max_inflight < 1 or max_retries < 0:
            raise ValueError("max_inflight must be >= 1, max_retries >= 0")
        if logprobs not in LOGPROBS_MODES:
            raise ValueError(f"logprobs {logprobs!r} must be one of {', '.join(LOGPROBS_MODES)}")
        if weights_writer is not None and sync_dir is None:
            raise ValueError("weights_writer needs sync_dir (the weights are written to <sync_dir>/weights)")
        self.model = model
        self._fixed_model = model is not None
        self.eod_token_id = eod_token_id
        self.max_inflight = max_inflight
        self.request_timeout = request_timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.api_key = api_key
        self.sync_dir = sync_dir
        self.reload = reload
        self.reload_endpoint = reload_endpoint
        self.reload_body = reload_body if reload_body is not None else {"model_path": "{model_path}"}
        self.restart_command = restart_command
        self.startup_timeout = startup_timeout
        self.export_dtype = export_dtype
        self.export_timeout = export_timeout
        self.reload_timeout = reload_timeout
        self.extra_body = dict(extra_body or {})
        self.logprobs = logprobs
        self.weights_writer = weights_writer
        self.served_path: Optional[str] = None        # the folder the last sync loaded
        self.synced_iteration: Optional[int] = None
        self.last_sync: Optional[dict] = None         # bytes and seconds of the last sync (every rank)
        self._group = _rollout_group()                # (group, src rank) of collective generate, or None
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._pool_lock = threading.Lock()
        self._server: Optional[subprocess.Popen] = None
        self._server_log: Optional[str] = None

    # ---- HTTP ---------------------------------------------------------------------------------
    def _endpoint(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else self.url + path

    def _request(self, method: str, path: str, body: Optional[dict] = None, *, timeout: Optional[float] = None,
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
                excerpt = _excerpt(e.read())
                err = _HTTPStatusError(f"{method} {url}: HTTP {e.code} {e.reason}: {excerpt}", e.code)
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
                raise RolloutError(f"{method} {url}: response is not JSON ({e}): {_excerpt(raw)}") from None
        raise RolloutError(f"{last} [gave up after {retries + 1} attempt(s)]")

    def served_models(self) -> list[dict]:
        """GET /v1/models: the `data` list."""
        resp = self._request("GET", "/v1/models")
        data = resp.get("data") if isinstance(resp, dict) else None
        if not isinstance(data, list):
            raise RolloutError(f"GET {self.url}/v1/models: no `data` list in the response: {_excerpt(resp)}")
        return data

    def _model_name(self) -> str:
        if self.model is None:
            models = self.served_models()
            if not models or not isinstance(models[0], dict) or "id" not in models[0]:
                raise RolloutError(f"GET {self.url}/v1/models: the server lists no model")
            self.model = str(models[0]["id"])
        return self.model

    # ---- generation -------------------------------------------------------------------------
    def _body(self, prompt: Sequence[int], n: int, s: SamplingConfig, seed: int) -> dict:
        body = {"model": self._model_name(), "prompt": [int(t) for t in prompt], "n": n,
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

    def _one(self, prompt: Sequence[int], n: int, s: SamplingConfig, seed: int) -> list[Rollout]:
        url = f"{self.url}/v1/completions"
        resp = self._request("POST", "/v1/completions", self._body(prompt, n, s, seed))
        choices = resp.get("choices") if isinstance(resp, dict) else None
        if not isinstance(choices, list):
            raise RolloutError(f"POST {url}: no `choices` list in the response: {_excerpt(resp)}")
        if len(choices) != n:
            raise RolloutError(f"POST {url}: asked for n={n} responses, got {len(choices)}")
        by_index: dict[int, Rollout] = {}
        for pos, c in enumerate(choices):
            idx = c.get("index", pos) if isinstance(c, dict) else pos
            if not isinstance(c, dict) or not isinstance(idx, int) or not 0 <= idx < n or idx in by_index:
                raise RolloutError(f"POST {url}: choice {pos} is malformed or has a bad/duplicate index: "
                                   f"{_excerpt(c)}")
            by_index[idx] = _parse_choice(c, url, idx, s.max_new_tokens)
        return [by_index[j] for j in range(n)]

    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingConfig) -> list[list[Rollout]]:
        """`n` rollouts per prompt; collective over the ranks that share a data-parallel rank (the
        group's first rank talks to the server and broadcasts; see the module docstring)."""
        if self._group is None:
            return self._generate(prompts, n, sampling)
        dist = _dist()
        group, src = self._group
        error: Optional[Exception] = None
        box: list = [None]
        if dist.get_rank() == src:
            try:
                box = [(self._generate(prompts, n, sampling), None)]
            except Exception as e:   # every rank of the group must learn about it, or the others hang
                error = e
                box = [(None, f"{type(e).__name__}: {e}")]
        _broadcast(dist, box, src, group)
        result, message = box[0]
        if error is not None:
            raise error
        if message is not None:
            raise RolloutError(f"rollouts failed on rank {src} (the rank that talks to {self.url} for this "
                               f"model-parallel group): {message}")
        return result

    def _generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingConfig) -> list[list[Rollout]]:
        if self.logprobs == "raw" and sampling.temperature != 1.0:
            raise ValueError(f"the server reports raw log-probs (temperature 1), the rollouts are sampled at temperature "
                             f"{sampling.temperature}: log softmax(z / T) cannot be rebuilt from them (it needs the "
                             f"whole distribution); serve tempered log-probs (logprobs='tempered') or sample at 1")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if not prompts:
            return []
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise RolloutError(f"prompt {i} is empty (the server needs at least one token)")
        self._model_name()                  # once, before the fan-out
        base = (sampling.seed * 1_000_003) % 2**31
        seeds = [(base + i * n) % 2**31 for i in range(len(prompts))]   # servers seed sample j with seed + j
        with self._pool_lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(self.max_inflight, thread_name_prefix="rollout")
            pool = self._pool
        futures = [pool.submit(self._one, p, n, sampling, seed) for p, seed in zip(prompts, seeds)]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise

    # ---- weight sync ------------------------------------------------------------------------
    def sync_weights(self, iteration: int, checkpoint_dir: Optional[str] = None) -> None:
        """Make the server serve the trainer's weights of `iteration` (collective when torch.distributed
        is initialised; see the module docstring). With a `weights_writer` the weights are written
        first; otherwise `checkpoint_dir` is a checkpoint folder (a --save root) holding `iteration`.
        An iteration already served is skipped (the same decision on every rank)."""
        if self.synced_iteration == iteration:
            return
        dist = _dist()
        rank = dist.get_rank() if dist is not None else 0
        t0 = time.perf_counter()
        if self.weights_writer is not None:
            checkpoint_dir = os.path.join(self.sync_dir, "weights")
            self.weights_writer(checkpoint_dir, iteration)        # collective over all ranks
        written_s = time.perf_counter() - t0
        error: Optional[str] = None
        stats: Optional[dict] = None
        if rank == 0:
            try:
                stats = self._sync_rank0(iteration, checkpoint_dir, written_s)
            except Exception as e:   # every rank must learn about it, or the others hang in the broadcast
                if dist is None:
                    raise
                error = f"{type(e).__name__}: {e}"
        if dist is not None:
            box = [(error, stats)]
            _broadcast(dist, box, 0, None)
            error, stats = box[0]
            if error is not None:
                raise RolloutError(f"weight sync at iteration {iteration} failed on rank 0: {error}")
        self.synced_iteration = iteration
        self.last_sync = stats
        if not self._fixed_model:
            self.model = None               # the served name may have changed (looked up on next use)

    def _sync_rank0(self, iteration: int, checkpoint_dir: Optional[str], written_s: float) -> dict:
        if checkpoint_dir is None:
            raise RolloutError("the external rollout engine syncs weights from a checkpoint: sync_weights needs "
                               "checkpoint_dir (a checkpoint folder holding the iteration) or a weights_writer")
        if self.sync_dir is None:
            raise RolloutError("the external rollout engine needs sync_dir to export checkpoints for the server")
        stats = {"iteration": iteration, "reload": self.reload}
        if self.weights_writer is not None:   # training.checkpointing.checkpoint_path's layout
            stats.update(weights_bytes=_folder_bytes(os.path.join(checkpoint_dir, f"iter_{iteration:07d}")),
                         weights_s=written_s)
        hf = os.path.abspath(os.path.join(self.sync_dir, "hf"))
        new, prev = hf + ".new", hf + ".prev"
        t0 = time.perf_counter()
        self.export(checkpoint_dir, iteration, new)
        stats.update(export_bytes=_folder_bytes(new), export_s=time.perf_counter() - t0)
        # Publish by renames in one folder: `hf` is never torn; the folder the server loaded moves to
        # `hf.prev` (files it still holds stay valid) and is deleted once the reload succeeded.
        shutil.rmtree(prev, ignore_errors=True)
        if os.path.exists(hf):
            os.replace(hf, prev)
        os.replace(new, hf)
        t0 = time.perf_counter()
        self.load_folder(hf, iteration)
        stats["reload_s"] = time.perf_counter() - t0
        shutil.rmtree(prev, ignore_errors=True)
        stats["total_s"] = written_s + stats["export_s"] + stats["reload_s"]
        weights = (f"weights {_size(stats['weights_bytes'])} written in {written_s:.1f} s"
                   if "weights_bytes" in stats else f"weights from {checkpoint_dir}")
        print(f"> weight sync for iteration {iteration}: {weights}, HF export {_size(stats['export_bytes'])} in "
              f"{stats['export_s']:.1f} s, reload ({self.reload}) {stats['reload_s']:.1f} s, total "
              f"{stats['total_s']:.1f} s", flush=True)
        return stats

    def export(self, checkpoint_dir: str, iteration: int, folder: str) -> None:
        """checkpoint -> HF folder, in a child process (see the module docstring)."""
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        # The child leaves without interpreter teardown once the folder is published (gloo's threads can
        # abort it at exit: distributed.exit_without_teardown; seen once in the suite, exit -6).
        code = ("import json, sys\n"
                "from megatron_rpt.convert.checkpoint import export_hf\n"
                "from megatron_rpt.distributed import exit_without_teardown\n"
                "a = json.loads(sys.argv[1])\n"
                "r = export_hf(a['load'], a['output'], dtype=a['dtype'], iteration=a['iteration'], force=True,"
                " progress=False)\n"
                "print('MRPT_EXPORT ' + json.dumps({k: r[k] for k in ('path', 'iteration') if k in r}))\n"
                "exit_without_teardown(0)\n")
        args = json.dumps({"load": checkpoint_dir, "output": folder, "dtype": self.export_dtype,
                           "iteration": iteration})
        try:
            env = dict(_child_env(), CUDA_VISIBLE_DEVICES="")   # the export runs on CPU (the trainer holds the GPU)
            proc = subprocess.run([sys.executable, "-c", code, args], env=env, capture_output=True,
                                  text=True, timeout=self.export_timeout)
        except subprocess.TimeoutExpired:
            raise RolloutError(f"exporting {checkpoint_dir} iteration {iteration} to {folder} took more than "
                               f"{self.export_timeout:.0f} s") from None
        if proc.returncode != 0 or not os.path.isfile(os.path.join(folder, "config.json")):
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-8:]
            raise RolloutError(f"exporting {checkpoint_dir} iteration {iteration} to {folder} failed "
                               f"(exit {proc.returncode}):\n  " + "\n  ".join(tail))

    def load_folder(self, folder: str, iteration: Optional[int] = None) -> None:
        """Make the server serve the HF folder `folder` (per `reload`), then check it does."""
        folder = os.path.abspath(folder)
        version = str(iteration) if iteration is not None else None
        if self.reload == "none":
            self.served_path = folder
            return
        if self.reload == "sglang":
            resp = self._request("POST", "/update_weights_from_disk",
                                 {"model_path": folder, "weight_version": version},
                                 timeout=self.reload_timeout, retries=0)
            if not isinstance(resp, dict) or resp.get("success") is not True:
                raise RolloutError(f"POST {self.url}/update_weights_from_disk ({folder}) did not succeed: "
                                   f"{_excerpt(resp)}")
            info = self._request("GET", "/get_model_info")
            got = info.get("model_path") if isinstance(info, dict) else None
            if not _same_path(got, folder):
                raise RolloutError(f"after reloading, GET {self.url}/get_model_info reports model_path={got!r}, "
                                   f"expected {folder}")
            # The sync reloads one path over and over: the version (where reported) tells old from new.
            got_version = info.get("weight_version")
            if version is not None and got_version is not None and str(got_version) != version:
                raise RolloutError(f"after reloading, GET {self.url}/get_model_info reports weight_version="
                                   f"{got_version!r}, expected {version}")
        elif self.reload == "vllm":
            try:
                self._request("POST", "/collective_rpc",
                              {"method": "reload_weights",
                               "kwargs": {"weights_path": folder, "is_checkpoint_format": True}},
                              timeout=self.reload_timeout, retries=0)
            except _HTTPStatusError as e:
                hint = (" (start vLLM with VLLM_SERVER_DEV_MODE=1: /collective_rpc is a dev-mode endpoint)"
                        if e.status == 404 else "")
                raise RolloutError(f"{e}{hint}") from None
            # KV blocks cached for earlier prompts were computed with the old weights.
            for attempt in range(5):
                resp = self._request("POST", "/reset_prefix_cache", timeout=self.reload_timeout, retries=0)
                if not isinstance(resp, dict) or resp.get("success", True):
                    break
                time.sleep(0.2 * 2 ** attempt)      # blocks still held by finishing requests
            else:
                raise RolloutError(f"POST {self.url}/reset_prefix_cache kept answering success=false after the "
                                   "reload: cached prefixes would still hold the old weights' KV")
        elif self.reload == "endpoint":
            body = _substitute(self.reload_body, model_path=folder, iteration=version or "")
            self._request("POST", self.reload_endpoint, body, timeout=self.reload_timeout, retries=0,
                          expect_json=False)
            self._check_models(folder)
        elif self.reload == "restart":
            self.start_server(folder)
        self.served_path = folder
        if not self._fixed_model:
            self.model = None               # the served name may have changed (looked up on next use)

    def _check_models(self, folder: str) -> None:
        models = self.served_models()
        names = [(m.get("root"), m.get("id")) for m in models if isinstance(m, dict)]
        if not any(_same_path(root, folder) or _same_path(mid, folder) for root, mid in names):
            raise RolloutError(f"after reloading, GET {self.url}/v1/models lists {names} (root, id); expected "
                               f"{folder}")

    # ---- a server this engine runs (reload="restart") ----------------------------------------
    def start_server(self, folder: str) -> None:
        """(Re)start the server on `folder` with `restart_command`; wait for /health and check /v1/models."""
        self.stop_server()
        cmd = self.restart_command
        argv = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
        argv = [a.replace("{model_path}", folder) for a in argv]
        log_dir = self.sync_dir or os.path.dirname(folder)
        os.makedirs(log_dir, exist_ok=True)
        self._server_log = os.path.join(log_dir, "rollout_server.log")
        start = os.path.getsize(self._server_log) if os.path.isfile(self._server_log) else 0
        with open(self._server_log, "ab") as log:
            self._server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=_child_env(),
                                            start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._server.poll() is not None:
                raise RolloutError(f"the rollout server ({argv[0]} ...) exited with {self._server.returncode} "
                                   f"before {self.url}/health answered; log {self._server_log}:\n"
                                   f"{_tail(self._server_log, start)}")
            try:
                self._request("GET", "/health", timeout=5, retries=0, expect_json=False)
                break
            except RolloutError:
                if time.monotonic() > deadline:
                    self.stop_server()
                    raise RolloutError(f"{self.url}/health did not answer within {self.startup_timeout:.0f} s of "
                                       f"starting {argv[0]}; log {self._server_log}:\n{_tail(self._server_log, start)}")
                time.sleep(0.5)
        self._check_models(folder)

    def stop_server(self, timeout: float = 30.0) -> None:
        """Stop the server process this engine started (its whole process group), if any."""
        proc, self._server = self._server, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass

    def close(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        self.stop_server()


# ---- helpers ----------------------------------------------------------------------------------
def _parse_choice(c: dict, url: str, idx: int, max_tokens: int) -> Rollout:
    where = f"POST {url}: choice {idx}"
    lp = c.get("logprobs")
    if not isinstance(lp, dict) or not isinstance(lp.get("token_logprobs"), list):
        raise RolloutError(f"{where} has no logprobs.token_logprobs (does the server support `logprobs`?): "
                           f"{_excerpt(c)}")
    log_probs = lp["token_logprobs"]
    tokens = c.get("token_ids")
    if tokens is None:
        names = lp.get("tokens")
        if not isinstance(names, list):
            raise RolloutError(f"{where} has neither token_ids nor logprobs.tokens: {_excerpt(c)}")
        try:
            tokens = [int(str(t).rsplit("token_id:", 1)[1]) for t in names]
        except (IndexError, ValueError):
            raise RolloutError(f"{where}: logprobs.tokens are not 'token_id:N' (a vLLM server needs "
                               f"return_tokens_as_token_ids; this server ignored it): {_excerpt(names[:4])}") from None
    if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
        raise RolloutError(f"{where}: token_ids is not a list of integers: {_excerpt(tokens)}")
    if len(tokens) != len(log_probs):
        raise RolloutError(f"{where}: {len(tokens)} tokens but {len(log_probs)} log-probs")
    if any(not isinstance(x, (int, float)) or isinstance(x, bool) for x in log_probs):
        raise RolloutError(f"{where}: missing (null) or non-numeric log-probs: {_excerpt(log_probs)}")
    if len(tokens) > max_tokens:
        raise RolloutError(f"{where}: {len(tokens)} tokens for max_tokens={max_tokens}")
    reason = c.get("finish_reason")
    if reason not in ("stop", "length"):
        raise RolloutError(f"{where}: finish_reason {reason!r} (expected 'stop' or 'length')")
    text = c.get("text")
    return Rollout(tokens=list(tokens), log_probs=[float(x) for x in log_probs],
                   text=text if isinstance(text, str) else "", finished=reason == "stop",
                   extra={"finish_reason": reason, "stop_reason": c.get("stop_reason")})


def _excerpt(obj: Any, limit: int = 300) -> str:
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


def _same_path(a: Any, b: Optional[str]) -> bool:
    if not isinstance(a, str) or b is None:
        return False
    return os.path.realpath(a.rstrip("/")) == os.path.realpath(b.rstrip("/"))


def _substitute(obj: Any, **values: str) -> Any:
    if isinstance(obj, str):
        for k, v in values.items():
            obj = obj.replace("{" + k + "}", v)
        return obj
    if isinstance(obj, dict):
        return {k: _substitute(v, **values) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_substitute(v, **values) for v in obj]
    return obj


def _child_env() -> dict:
    """This process's environment without the launcher's rank variables (a child is not a rank)."""
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCHER_VARS and not k.startswith(_LAUNCHER_PREFIXES)}
    return env


def _tail(path: Optional[str], start: int = 0, lines: int = 15) -> str:
    """The last lines of a log written since byte `start`."""
    if not path or not os.path.isfile(path):
        return ""
    with open(path, "rb") as f:
        f.seek(max(start, os.path.getsize(path) - 8192))
        return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-lines:])


def _folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _broadcast(dist, box: list, src: int, group) -> None:
    """broadcast_object_list from global rank `src` over `group` (None: the default group); an NCCL
    group moves the pickled bytes through the current CUDA device, gloo through the CPU."""
    device = None
    if "nccl" in str(dist.get_backend(group)).lower():
        import torch
        device = torch.device("cuda", torch.cuda.current_device())
    dist.broadcast_object_list(box, src=src, group=group, device=device)


def _rollout_group():
    """(group, first global rank) of the ranks that share this rank's data-parallel rank, or None: no
    process group, Megatron-Core's parallel_state not initialised, or a group of one rank.

    That is Megatron-Core's model-parallel group (TP x PP: `get_ranks('tp-pp')` in 0.16's
    initialize_model_parallel) unless context parallelism is on: CP ranks share the data-parallel
    rank (the same sequences, split along the sequence) but sit in different model-parallel groups,
    and Megatron-Core has no TP x CP x PP group, so one is created here (collective over all ranks)."""
    dist = _dist()
    if dist is None:
        return None
    ps = sys.modules.get("megatron.core.parallel_state")    # never imported: never initialised (and no
    if ps is None or not ps.model_parallel_is_initialized():  # seconds spent importing megatron.core here)
        return None
    if ps.get_context_parallel_world_size() == 1:
        group = ps.get_model_parallel_group()
        if dist.get_world_size(group) == 1:
            return None
        return group, ps.get_model_parallel_src_rank()
    dp_ranks: list = [None] * dist.get_world_size()
    dist.all_gather_object(dp_ranks, ps.get_data_parallel_rank())
    mine = None
    for dp in sorted(set(dp_ranks)):          # every rank creates every group, in the same order
        ranks = [r for r, d in enumerate(dp_ranks) if d == dp]
        group = dist.new_group(ranks)
        if dist.get_rank() in ranks:
            mine = (group, ranks[0])
    return mine


def _dist():
    """torch.distributed when a default process group exists (imported lazily: a client needs no torch)."""
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    return dist if dist.is_available() and dist.is_initialized() else None
