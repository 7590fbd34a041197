"""The external rollout engine's weight sync: trainer weights -> a rolling HF folder -> the server
reloads it (`WeightSync`).

Weight sync (`sync(iteration)`), model only, one rolling folder each, atomic:
1. every rank calls `weights_writer(<sync_dir>/weights, iteration)` (the RPT loop passes
   `training.checkpointing.save_weights`: a Megatron dist-checkpoint of the model's sharded state
   dict only, no optimizer or RNG state, written to a `.tmp` name and renamed; the previous one is
   then deleted). Without a writer, `sync(iteration, checkpoint_dir)` exports an existing
   checkpoint folder instead (e.g. one from tools/convert_checkpoint.py).
2. rank 0 runs `megatron_rpt.convert.checkpoint.export_hf` in a child process (it creates and
   destroys its own 1-rank process group, so it cannot run inside the trainer's; the launcher's
   RANK/WORLD_SIZE/MASTER_*/SLURM_* are removed from the child's environment: server.child_env)
   into `<sync_dir>/hf.new`, a name the server never reads;
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
             "{model_path}" substituted, wait for GET /health, check /v1/models as above
             (server.ServerProcess).
  "none"     publish only (something else reloads the server; the RPT loop refuses it unless
             --rollout-frozen-policy, which syncs nothing at all).

Collective contract: `sync` is called by every rank of the job with the same arguments; the writer
is collective, rank 0 (of the default group) exports and reloads, an error on rank 0 is broadcast so
that every rank raises it. Without a process group it runs on the one process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any, Callable, Optional

from megatron_rpt.checkpoint.layout import checkpoint_path
from megatron_rpt.inference.base import RolloutError
from megatron_rpt.inference.external.client import Client, HTTPStatusError, excerpt, same_path
from megatron_rpt.inference.external.collective import broadcast, initialized_dist
from megatron_rpt.inference.external.server import ServerProcess, child_env

RELOAD_PROTOCOLS = ("none", "sglang", "vllm", "endpoint", "restart")
EXPORT_DTYPES = ("bf16", "fp32", "fp16")


class WeightSync:
    """The sync of one engine: `client` talks to the server, `server` (re)starts it for reload="restart";
    the other arguments are those of `OpenAICompatibleEngine` of the same names, checked there.

    `served_path`: the folder the last reload loaded; `synced_iteration`: the iteration the last sync
    served; `last_sync`: bytes and seconds of the last sync (on every rank)."""

    def __init__(self, client: Client, server: ServerProcess, *, sync_dir: Optional[str] = None,
                 reload: str = "none", reload_endpoint: Optional[str] = None, reload_body: Optional[dict] = None,
                 export_dtype: str = "bf16", export_timeout: float = 3600.0, reload_timeout: float = 1800.0,
                 weights_writer: Optional[Callable[[str, int], Any]] = None):
        self.client = client
        self.server = server
        self.sync_dir = sync_dir
        self.reload = reload
        self.reload_endpoint = reload_endpoint
        self.reload_body = reload_body if reload_body is not None else {"model_path": "{model_path}"}
        self.export_dtype = export_dtype
        self.export_timeout = export_timeout
        self.reload_timeout = reload_timeout
        self.weights_writer = weights_writer
        self.served_path: Optional[str] = None
        self.synced_iteration: Optional[int] = None
        self.last_sync: Optional[dict] = None

    def sync(self, iteration: int, checkpoint_dir: Optional[str] = None, *,
             export: Optional[Callable[[str, int, str], None]] = None,
             load: Optional[Callable[[str, Optional[int]], None]] = None) -> None:
        """Make the server serve the trainer's weights of `iteration` (collective when torch.distributed
        is initialised; see the module docstring). With a `weights_writer` the weights are written
        first; otherwise `checkpoint_dir` is a checkpoint folder (a --save root) holding `iteration`.
        An iteration already served is skipped (the same decision on every rank). `export` / `load`
        replace steps 2 and 4 (default: this object's `export` / `load_folder`)."""
        if self.synced_iteration == iteration:
            return
        dist = initialized_dist()
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
                stats = self._sync_rank0(iteration, checkpoint_dir, written_s, export or self.export,
                                         load or self.load_folder)
            except Exception as e:   # every rank must learn about it, or the others hang in the broadcast
                if dist is None:
                    raise
                error = f"{type(e).__name__}: {e}"
        if dist is not None:
            box = [(error, stats)]
            broadcast(dist, box, 0, None)
            error, stats = box[0]
            if error is not None:
                raise RolloutError(f"weight sync at iteration {iteration} failed on rank 0: {error}")
        self.synced_iteration = iteration
        self.last_sync = stats
        self.client.forget_model()          # the served name may have changed (looked up on next use)

    def _sync_rank0(self, iteration: int, checkpoint_dir: Optional[str], written_s: float,
                    export: Callable[[str, int, str], None], load: Callable[[str, Optional[int]], None]) -> dict:
        if checkpoint_dir is None:
            raise RolloutError("the external rollout engine syncs weights from a checkpoint: sync_weights needs "
                               "checkpoint_dir (a checkpoint folder holding the iteration) or a weights_writer")
        if self.sync_dir is None:
            raise RolloutError("the external rollout engine needs sync_dir to export checkpoints for the server")
        stats = {"iteration": iteration, "reload": self.reload}
        if self.weights_writer is not None:
            stats.update(weights_bytes=_folder_bytes(checkpoint_path(checkpoint_dir, iteration)),
                         weights_s=written_s)
        hf = os.path.abspath(os.path.join(self.sync_dir, "hf"))
        new, prev = hf + ".new", hf + ".prev"
        t0 = time.perf_counter()
        export(checkpoint_dir, iteration, new)
        stats.update(export_bytes=_folder_bytes(new), export_s=time.perf_counter() - t0)
        # Publish by renames in one folder: `hf` is never torn; the folder the server loaded moves to
        # `hf.prev` (files it still holds stay valid) and is deleted once the reload succeeded.
        shutil.rmtree(prev, ignore_errors=True)
        if os.path.exists(hf):
            os.replace(hf, prev)
        os.replace(new, hf)
        t0 = time.perf_counter()
        load(hf, iteration)
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
            env = dict(child_env(), CUDA_VISIBLE_DEVICES="")   # the export runs on CPU (the trainer holds the GPU)
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
        client, url = self.client, self.client.url
        if self.reload == "none":
            self.served_path = folder
            return
        if self.reload == "sglang":
            resp = client.request("POST", "/update_weights_from_disk",
                                  {"model_path": folder, "weight_version": version},
                                  timeout=self.reload_timeout, retries=0)
            if not isinstance(resp, dict) or resp.get("success") is not True:
                raise RolloutError(f"POST {url}/update_weights_from_disk ({folder}) did not succeed: "
                                   f"{excerpt(resp)}")
            info = client.request("GET", "/get_model_info")
            got = info.get("model_path") if isinstance(info, dict) else None
            if not same_path(got, folder):
                raise RolloutError(f"after reloading, GET {url}/get_model_info reports model_path={got!r}, "
                                   f"expected {folder}")
            # The sync reloads one path over and over: the version (where reported) tells old from new.
            got_version = info.get("weight_version")
            if version is not None and got_version is not None and str(got_version) != version:
                raise RolloutError(f"after reloading, GET {url}/get_model_info reports weight_version="
                                   f"{got_version!r}, expected {version}")
        elif self.reload == "vllm":
            try:
                client.request("POST", "/collective_rpc",
                               {"method": "reload_weights",
                                "kwargs": {"weights_path": folder, "is_checkpoint_format": True}},
                               timeout=self.reload_timeout, retries=0)
            except HTTPStatusError as e:
                hint = (" (start vLLM with VLLM_SERVER_DEV_MODE=1: /collective_rpc is a dev-mode endpoint)"
                        if e.status == 404 else "")
                raise RolloutError(f"{e}{hint}") from None
            # KV blocks cached for earlier prompts were computed with the old weights.
            for attempt in range(5):
                resp = client.request("POST", "/reset_prefix_cache", timeout=self.reload_timeout, retries=0)
                if not isinstance(resp, dict) or resp.get("success", True):
                    break
                time.sleep(0.2 * 2 ** attempt)      # blocks still held by finishing requests
            else:
                raise RolloutError(f"POST {url}/reset_prefix_cache kept answering success=false after the "
                                   "reload: cached prefixes would still hold the old weights' KV")
        elif self.reload == "endpoint":
            body = _substitute(self.reload_body, model_path=folder, iteration=version or "")
            client.request("POST", self.reload_endpoint, body, timeout=self.reload_timeout, retries=0,
                           expect_json=False)
            client.check_models(folder)
        elif self.reload == "restart":
            self.server.start(folder)
        self.served_path = folder
        client.forget_model()               # the served name may have changed (looked up on next use)


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


def _folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
