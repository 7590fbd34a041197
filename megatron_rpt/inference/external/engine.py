"""`OpenAICompatibleEngine`: the external rollout engine as a `RolloutEngine`, built from a
`client.Client` (HTTP), a `weight_sync.WeightSync` and a `server.ServerProcess`, its methods
delegating to them; it checks the arguments and runs `generate`: one request per prompt, at most
`max_inflight` in flight, prompt i's request seeded with base + i * n (servers seed its sample j with
that + j; base derived from `sampling.seed`).

Collective contract. `generate`: when torch.distributed and Megatron-Core's parallel_state are
initialised, the ranks that share a data-parallel rank (Megatron-Core's model-parallel group, TP x
PP; with context parallelism its TP x CP x PP ranks, a group this engine creates at construction:
collective.rollout_group) must call it together with the same arguments. The group's first rank
alone talks to the server and broadcasts the rollouts (broadcast_object_list; on an NCCL group
through the current CUDA device), so every rank trains on the same sequences (servers are not
batch-invariant: two requests for one prompt may differ even with one seed); an error there is
raised on every rank of the group (a RolloutError naming that rank elsewhere). Groups of one rank
skip the broadcast. `sync_weights`: called by every rank of the job with the same arguments (the
weight_sync module docstring). The construction is collective when context parallelism is on.
Without a process group the class is a plain single-process client.
"""

from __future__ import annotations

import concurrent.futures
import threading
from typing import Any, Callable, Optional, Sequence, Union

from megatron_rpt.inference.base import Rollout, RolloutEngine, RolloutError, SamplingConfig
from megatron_rpt.inference.external.client import Client
from megatron_rpt.inference.external.collective import broadcast, initialized_dist, rollout_group
from megatron_rpt.inference.external.server import ServerProcess
from megatron_rpt.inference.external.weight_sync import EXPORT_DTYPES, RELOAD_PROTOCOLS, WeightSync

LOGPROBS_MODES = ("tempered", "raw")


class OpenAICompatibleEngine(RolloutEngine):
    """Rollouts from an external OpenAI-compatible server (see the package docstring).

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
        logprobs: one of LOGPROBS_MODES, what the server's log-probs are (package docstring).
        weights_writer: `writer(root, iteration)`, collective over all ranks: writes the trainer's
            weights as a model-only checkpoint under `root` (training.checkpointing.save_weights).

    The parts: `client` (requests, the served model), `weight_sync` (`sync_dir`, `served_path`,
    `synced_iteration`, `last_sync`), `server` (`proc`: the server process started for "restart").
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
        if reload not in RELOAD_PROTOCOLS:
            raise ValueError(f"reload {reload!r} must be one of {', '.join(RELOAD_PROTOCOLS)}")
        if reload == "endpoint" and not reload_endpoint:
            raise ValueError('reload="endpoint" needs reload_endpoint (a path like "/my_reload" or a URL)')
        if reload == "restart" and not restart_command:
            raise ValueError('reload="restart" needs restart_command (with "{model_path}")')
        if export_dtype not in EXPORT_DTYPES:
            raise ValueError(f"export_dtype {export_dtype!r} must be bf16, fp32 or fp16")
        if max_inflight < 1 or max_retries < 0:
            raise ValueError("max_inflight must be >= 1, max_retries >= 0")
        if logprobs not in LOGPROBS_MODES:
            raise ValueError(f"logprobs {logprobs!r} must be one of {', '.join(LOGPROBS_MODES)}")
        if weights_writer is not None and sync_dir is None:
            raise ValueError("weights_writer needs sync_dir (the weights are written to <sync_dir>/weights)")
        self.client = Client(url, model=model, eod_token_id=eod_token_id, request_timeout=request_timeout,
                             max_retries=max_retries, backoff=backoff, api_key=api_key, extra_body=extra_body)
        self.server = ServerProcess(self.client, restart_command, log_dir=sync_dir, startup_timeout=startup_timeout)
        self.weight_sync = WeightSync(self.client, self.server, sync_dir=sync_dir, reload=reload,
                                      reload_endpoint=reload_endpoint, reload_body=reload_body,
                                      export_dtype=export_dtype, export_timeout=export_timeout,
                                      reload_timeout=reload_timeout, weights_writer=weights_writer)
        self.url = self.client.url
        self.max_inflight = max_inflight
        self.logprobs = logprobs
        self._group = rollout_group()                 # (group, src rank) of collective generate, or None
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._pool_lock = threading.Lock()

    # ---- what the parts hold ------------------------------------------------------------------
    @property
    def model(self) -> Optional[str]:
        """The served model name sent (None: not looked up yet)."""
        return self.client.model

    @property
    def sync_dir(self) -> Optional[str]:
        return self.weight_sync.sync_dir

    @property
    def served_path(self) -> Optional[str]:
        """The folder the last sync (or load_folder) loaded."""
        return self.weight_sync.served_path

    @property
    def synced_iteration(self) -> Optional[int]:
        return self.weight_sync.synced_iteration

    @property
    def last_sync(self) -> Optional[dict]:
        """Bytes and seconds of the last sync (every rank)."""
        return self.weight_sync.last_sync

    def served_models(self) -> list[dict]:
        """GET /v1/models: the `data` list."""
        return self.client.served_models()

    # ---- generation -------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingConfig) -> list[list[Rollout]]:
        """`n` rollouts per prompt; collective over the ranks that share a data-parallel rank (the
        group's first rank talks to the server and broadcasts; see the module docstring)."""
        if self._group is None:
            return self._generate(prompts, n, sampling)
        dist = initialized_dist()
        group, src = self._group
        error: Optional[Exception] = None
        box: list = [None]
        if dist.get_rank() == src:
            try:
                box = [(self._generate(prompts, n, sampling), None)]
            except Exception as e:   # every rank of the group must learn about it, or the others hang
                error = e
                box = [(None, f"{type(e).__name__}: {e}")]
        broadcast(dist, box, src, group)
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
        self.client.model_name()            # once, before the fan-out
        base = (sampling.seed * 1_000_003) % 2**31
        seeds = [(base + i * n) % 2**31 for i in range(len(prompts))]   # servers seed sample j with seed + j
        with self._pool_lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(self.max_inflight, thread_name_prefix="rollout")
            pool = self._pool
        futures = [pool.submit(self.client.complete, p, n, sampling, seed) for p, seed in zip(prompts, seeds)]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise

    # ---- weight sync (weight_sync.WeightSync) -------------------------------------------------
    def sync_weights(self, iteration: int, checkpoint_dir: Optional[str] = None) -> None:
        """Make the server serve the trainer's weights of `iteration` (collective when torch.distributed
        is initialised): `WeightSync.sync`, its export and reload steps through this engine's `export`
        and `load_folder`."""
        self.weight_sync.sync(iteration, checkpoint_dir, export=self.export, load=self.load_folder)

    def export(self, checkpoint_dir: str, iteration: int, folder: str) -> None:
        """checkpoint -> HF folder, in a child process (`WeightSync.export`)."""
        self.weight_sync.export(checkpoint_dir, iteration, folder)

    def load_folder(self, folder: str, iteration: Optional[int] = None) -> None:
        """Make the server serve the HF folder `folder` (per `reload`), then check it does."""
        self.weight_sync.load_folder(folder, iteration)

    # ---- a server this engine runs (reload="restart"; server.ServerProcess) ----------------------
    def start_server(self, folder: str) -> None:
        """(Re)start the server on `folder` with `restart_command`; wait for /health and check /v1/models."""
        self.server.start(folder)

    def stop_server(self, timeout: float = 30.0) -> None:
        """Stop the server process this engine started (its whole process group), if any."""
        self.server.stop(timeout)

    def close(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        self.stop_server()
