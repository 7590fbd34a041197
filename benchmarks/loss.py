"""Benchmark: the generalized beta/lambda loss against Megatron-Core's vocab-parallel cross-entropy.

What is measured, per grid point (tokens x vocabulary x logits dtype x TP size), side by side in
the same run on the same inputs:

  mcore_ce        baseline: ``megatron.core.tensor_parallel.vocab_parallel_cross_entropy(
                  logits.float(), target)`` (the upcast is what Megatron-LM's GPTModel does; a no-op
                  for fp32 logits; Megatron's function overwrites its fp32 input in place)
  mcore_fused_ce  CUDA only, when importable: ``megatron.core.fusions.fused_cross_entropy.
                  fused_vocab_parallel_cross_entropy(logits.float(), target, tp_group)``
  ours_ce         ``megatron_rpt.loss.generalized_vocab_parallel_loss`` at zero settings (= CE), called
                  with ``overwrite_logits=True`` as the training step's per-token head calls it
  ours_beta       beta=-0.25
  ours_low        lambda_low=-0.1, top_k=100
  ours_full       beta=-0.25, lambda_high=0.1, lambda_low=-0.1, top_k=100
  ours_stats      zero settings with ``stats={}`` requested (adds the top-k window and entropy)

* Wall time of forward + backward: the loss call plus ``torch.autograd.grad(loss, logits,
  grad_output)`` with a fixed random grad_output, so only the loss's own backward runs (nothing
  upstream of the logits). The logits are a NON-leaf tensor (a zero-cost autograd node marks the
  refilled buffer dirty, as the output layer's matmul would produce it), so both losses may
  reuse the logits' storage for the gradient. Before every call the buffer is refilled from a
  pristine copy of the same logits (outside the timed region; the correctness round uses new
  buffers). Median over ``--repeats`` rounds; each round runs every
  method once, in an order rotated by one per round; before the timed rounds, a correctness round
  runs every method once (it doubles as the warm-up) plus ``--warmup`` untimed rounds. With TP > 1
  the ranks meet at a barrier before every call and a call's time is the max over ranks.
* Peak memory, each (grid point, method) in a FRESH process (on CPU forked from a parent that has
  only imported the libraries; on CUDA spawned): after a small warm-up call (loads code, starts
  threads) the logits are generated in place, then on CPU the kernel's peak-RSS mark is reset
  (``/proc/self/clear_refs`` = 5), resident memory is read (VmRSS), the loss + backward run, and
  the peak is ``max(ru_maxrss, VmHWM)``; reported: peak minus the RSS before the call (the extra
  bytes over the logits and inputs), max over ranks. On CUDA: ``torch.cuda.max_memory_allocated``
  after ``reset_peak_memory_stats`` minus ``memory_allocated`` before the call.
* Correctness, in the timing run, before any time is taken (a failed check aborts the benchmark,
  no results are written): ours_ce loss and gradient against mcore_ce over all tokens and the
  whole vocabulary (max abs diff); every method's loss and gradient (and ours_stats' statistics)
  on 16 sampled tokens against a float64 autograd reference over the full gathered vocabulary.

Inputs: logits ~ N(0, 2^2) generated per rank (rank r's shard from its own seed), targets uniform
over the vocabulary (same on all ranks), logits shape [tokens, 1, V/TP], no padded vocabulary.

On CPU, ranks are forked processes over gloo, each with cores // TP intra-op threads (the
project's CPU policy); Megatron-Core runs under the project's CPU compatibility layer
(``megatron_rpt.platform.setup_platform(force_cpu=True)``), as in training.

Usage (defaults: the full grid; writes benchmarks/results/loss_<device>.json and .md):

    python benchmarks/loss.py --device cpu
    python benchmarks/loss.py --vocab 32000 --dtype fp32 --tp 1 --repeats 3 --output /tmp/loss
    python benchmarks/loss.py --vocab 32000 --dtype fp32 --tp 1 --profile ours_low   # op table, no results
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import json
import os
import shlex
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import machine  # benchmarks/machine.py

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BASELINE = "mcore_ce"
# name -> kwargs of generalized_vocab_parallel_loss (None: a Megatron baseline)
METHODS = {
    "mcore_ce": None,
    "mcore_fused_ce": None,
    "ours_ce": {},
    "ours_beta": {"beta": -0.25},
    "ours_low": {"lambda_low": -0.1, "top_k": 100},
    "ours_full": {"beta": -0.25, "lambda_high": 0.1, "lambda_low": -0.1, "top_k": 100},
    "ours_stats": {"stats": True},
}
METHOD_TEXT = {
    "mcore_ce": "Megatron-Core vocab_parallel_cross_entropy(logits.float(), target) (baseline)",
    "mcore_fused_ce": "Megatron-Core fused_vocab_parallel_cross_entropy(logits.float(), target, tp_group)",
    "ours_ce": "generalized loss, zero settings (cross-entropy)",
    "ours_beta": "generalized loss, beta=-0.25",
    "ours_low": "generalized loss, lambda_low=-0.1, top_k=100",
    "ours_full": "generalized loss, beta=-0.25, lambda_high=0.1, lambda_low=-0.1, top_k=100",
    "ours_stats": "generalized loss, zero settings, stats requested (top_k=100)",
}
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
LOGIT_STD = 2.0
N_SAMPLE = 16              # tokens checked against the float64 reference
TARGET_TIME_RATIO = 1.3
TARGET_MEM_RATIO = 1.0
MEM_RESOLUTION = 1 << 20   # RSS is page- and allocator-granular: extra bytes within 1 MiB of the baseline's count as equal
LARGE_VOCAB = 100_000      # --repeats-large applies from this vocabulary size on


# =============================================================================================
# Worker side (runs in the rank processes)
# =============================================================================================

def _torch():
    import torch
    return torch


def _make_non_leaf_fn():
    torch = _torch()

    class _AsNonLeaf(torch.autograd.Function):
        """Returns its input itself, now with a grad_fn: a non-leaf tensor without a copy."""

        @staticmethod
        def forward(ctx, x, anchor):
            ctx.mark_dirty(x)
            return x

        @staticmethod
        def backward(ctx, grad):
            return None, None

    return _AsNonLeaf


class _Ctx:
    """What a worker knows about its rank and inputs."""

    def __init__(self, spec: dict, rank: int, world: int):
        torch = _torch()
        self.spec, self.rank, self.world = spec, rank, world
        self.device = torch.device("cuda", rank) if spec["device"] == "cuda" else torch.device("cpu")
        self.dtype = getattr(torch, DTYPES[spec["dtype"]])
        self.tokens, self.vocab = spec["tokens"], spec["vocab"]
        self.local = self.vocab // world
        self.anchor = torch.zeros((), requires_grad=True, device=self.device)
        self.non_leaf = _make_non_leaf_fn()
        from megatron.core import parallel_state
        self.tp_group = parallel_state.get_tensor_model_parallel_group()

    def sync(self):
        if self.device.type == "cuda":
            _torch().cuda.synchronize(self.device)

    def barrier(self):
        self.sync()
        _torch().distributed.barrier()

    def logits(self, tokens: int | None = None):
        """This rank's shard [tokens, 1, V/TP], generated in place (no temporaries)."""
        torch = _torch()
        n = self.tokens if tokens is None else tokens
        gen = torch.Generator(device=self.device).manual_seed(self.spec["seed"] * 1009 + 17 * self.rank + 1)
        z = torch.empty(n, 1, self.local, dtype=self.dtype, device=self.device)
        step = max(1, (1 << 22) // self.local)
        for lo in range(0, n, step):
            part = z[lo:lo + step]
            torch.randn(part.shape, generator=gen, dtype=self.dtype, device=self.device, out=part)
            part.mul_(LOGIT_STD)
        return z

    def target_and_grad(self, tokens: int | None = None):
        torch = _torch()
        n = self.tokens if tokens is None else tokens
        gen = torch.Generator(device="cpu").manual_seed(self.spec["seed"] * 7 + 3)
        target = torch.randint(0, self.vocab, (n, 1), generator=gen).to(self.device)
        gout = torch.rand(n, 1, generator=gen).to(self.device)   # fp32, as a loss mask / num_tokens
        return target, gout

    def fresh(self, pristine, buffer=None):
        """A non-leaf copy of `pristine`: in a new tensor, or refilled into `buffer` (no page faults)."""
        torch = _torch()
        z = torch.empty_like(pristine) if buffer is None else buffer
        with torch.no_grad():
            z.copy_(pristine)
        return self.non_leaf.apply(z, self.anchor)

    def method_fn(self, name: str):
        """fn(logits, target) -> (loss, stats dict or None)."""
        if name == "mcore_ce":
            from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

            return lambda z, t: (vocab_parallel_cross_entropy(z.float(), t), None)
        if name == "mcore_fused_ce":
            from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

            return lambda z, t: (fused_vocab_parallel_cross_entropy(z.float(), t, self.tp_group), None)
        from megatron_rpt.loss import generalized_vocab_parallel_loss

        kw = dict(METHODS[name], overwrite_logits=True)    # as the training step's head calls it
        if self.spec.get("chunk_tokens"):
            kw["chunk_tokens"] = self.spec["chunk_tokens"]
        if kw.pop("stats", False):
            def fn(z, t):
                st = {}
                return generalized_vocab_parallel_loss(z, t, tp_group=self.tp_group, stats=st, **kw), st
            return fn
        return lambda z, t: (generalized_vocab_parallel_loss(z, t, tp_group=self.tp_group, **kw), None)


def _step(fn, z, target, gout):
    torch = _torch()
    loss, st = fn(z, target)
    (grad,) = torch.autograd.grad(loss, z, gout)
    return loss, grad, st


# ---------------------------------------------------------------------------------------------
# float64 reference on sampled tokens (full vocabulary, gathered over the TP group)
# ---------------------------------------------------------------------------------------------

def _reference(z64, x, g, kw: dict, top_k: int = 100):
    """Loss, gradient and statistics of the paper's loss in float64 by autograd (w detached).

    loss = -w log pi(x) - lambda_high pi(K \\ {x}) - lambda_low pi(T \\ {x}), w = sg(pi(x)**(1-(1-pi(x))**beta)),
    K = top-k by a stable descending sort (ties to the lower id), T = the rest.
    """
    torch = _torch()
    beta = float(kw.get("beta", 0.0))
    lh, ll = float(kw.get("lambda_high", 0.0)), float(kw.get("lambda_low", 0.0))
    k = int(kw.get("top_k", top_k))
    z = z64.clone().requires_grad_()
    logp = torch.log_softmax(z, -1)
    pi = logp.exp()
    rows = torch.arange(z.shape[0])
    lpx = logp[rows, x]
    px = lpx.exp()
    order = torch.sort(z.detach(), dim=-1, descending=True, stable=True).indices[:, :k]
    in_k = torch.zeros_like(z, dtype=torch.bool)
    in_k[rows[:, None], order] = True
    not_x = torch.ones_like(in_k)
    not_x[rows, x] = False
    p_k = (pi * (in_k & not_x)).sum(-1)
    p_t = (pi * (~in_k & not_x)).sum(-1)
    w = (px ** (1 - (1 - px) ** beta)).detach() if beta != 0 else torch.ones_like(px)
    loss = -w * lpx - lh * p_k - ll * p_t
    (grad,) = torch.autograd.grad((loss * g).sum(), z)
    with torch.no_grad():
        stats = {
            "cross_entropy": -lpx,
            "entropy": -(pi * logp).sum(-1),
            "target_prob": px,
            "top1": (z64[rows, x] >= z64.amax(-1)).double(),
            "topk_mass": (pi * in_k).sum(-1),
            "tail_mass": (pi * ~in_k).sum(-1),
        }
    return loss.detach(), grad, stats


def _close(a, b, rtol: float, atol: float):
    """(max abs diff, ok) for a vs reference b (float64 comparisons)."""
    torch = _torch()
    a, b = a.detach().double(), b.detach().double()
    d = (a - b).abs()
    ok = bool((d <= atol + rtol * b.abs()).all()) and bool(torch.isfinite(a).all())
    return float(d.max()) if d.numel() else 0.0, ok


def _job_time(ctx: _Ctx) -> dict:
    torch = _torch()
    spec = ctx.spec
    methods = spec["methods"]
    pristine = ctx.logits()
    target, gout = ctx.target_and_grad()
    fns = {m: ctx.method_fn(m) for m in methods}
    grad_rtol = 1e-4 if ctx.dtype == torch.float32 else 8e-3

    # --- correctness round (also the warm-up) ---
    gen = torch.Generator().manual_seed(spec["seed"] + 11)
    sample = torch.randperm(ctx.tokens, generator=gen)[:N_SAMPLE].sort().values.to(ctx.device)
    zs_local = pristine.view(ctx.tokens, ctx.local)[sample].double().contiguous()
    parts = [torch.empty_like(zs_local) for _ in range(ctx.world)]
    torch.distributed.all_gather(parts, zs_local, group=ctx.tp_group)
    zs = torch.cat(parts, dim=-1).cpu()
    xs = target.view(-1)[sample].cpu()
    gs = gout.view(-1)[sample].double().cpu()
    cols = slice(ctx.rank * ctx.local, (ctx.rank + 1) * ctx.local)
    checks = {}
    kept = {}
    for m in methods:
        z = ctx.fresh(pristine)
        loss, grad, st = _step(fns[m], z, target, gout)
        ctx.sync()
        kw = METHODS[m] or {}
        ref_loss, ref_grad, ref_stats = _reference(zs, xs, gs, {k: v for k, v in kw.items() if k != "stats"})
        got_loss = loss.view(-1)[sample].cpu()
        got_grad = grad.view(ctx.tokens, ctx.local)[sample].cpu()
        gmax = float(ref_grad.abs().max())
        c = {}
        c["ref_loss_maxabs"], ok_l = _close(got_loss, ref_loss, 1e-5, 1e-5)
        c["ref_grad_maxabs"], ok_g = _close(got_grad, ref_grad[:, cols], grad_rtol, 1e-6 * gmax)
        ok = ok_l and ok_g
        if st is not None:
            for name, ref in ref_stats.items():
                d, ok_s = _close(st[name].view(-1)[sample].cpu(), ref, 1e-4, 1e-5)
                c[f"ref_stat_{name}_maxabs"] = d
                ok = ok and ok_s
        if m in (BASELINE, "ours_ce"):
            kept[m] = (loss.detach(), grad)
        else:
            del grad, z
        c["failures"] = 0 if ok else 1
        checks[m] = c
        del loss, st
    if BASELINE in kept and "ours_ce" in kept:
        (lb, gb), (lo_, go) = kept[BASELINE], kept["ours_ce"]
        c = checks["ours_ce"]
        c["vs_mcore_loss_maxabs"], ok_l = _close(lo_, lb, 1e-5, 1e-5)
        gb2, go2 = gb.view(ctx.tokens, ctx.local), go.view(ctx.tokens, ctx.local)
        worst, ok_g = 0.0, True
        gmax = float(gb2.abs().max())
        for lo in range(0, ctx.tokens, 256):
            d, ok_c = _close(go2[lo:lo + 256], gb2[lo:lo + 256], grad_rtol, 1e-6 * gmax)
            worst, ok_g = max(worst, d), ok_g and ok_c
        c["vs_mcore_grad_maxabs"] = worst
        c["failures"] += 0 if (ok_l and ok_g) else 1
    kept.clear()
    gc.collect()
    # max over ranks of every number
    keys = [(m, k) for m in methods for k in sorted(checks[m])]
    vec = torch.tensor([float(checks[m][k]) for m, k in keys], dtype=torch.float64, device=ctx.device)
    torch.distributed.all_reduce(vec, op=torch.distributed.ReduceOp.MAX, group=ctx.tp_group)
    for (m, k), v in zip(keys, vec.tolist()):
        checks[m][k] = v
    if any(checks[m]["failures"] for m in methods):
        return {"checks": checks, "times": {}, "failed": True}

    # --- timing ---
    times = {m: [] for m in methods}
    rounds = spec["warmup"] + spec["repeats"]
    work = torch.empty_like(pristine)
    for r in range(rounds):
        order = methods[r % len(methods):] + methods[:r % len(methods)]
        for m in order:
            z = ctx.fresh(pristine, work)
            ctx.barrier()
            t0 = time.perf_counter()
            loss, grad, st = _step(fns[m], z, target, gout)
            ctx.sync()
            dt = time.perf_counter() - t0
            del loss, grad, st, z
            if r >= spec["warmup"]:
                times[m].append(dt)
    info = {"threads": torch.get_num_threads()}
    if ctx.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(ctx.device)
    return {"checks": checks, "times": times, "failed": False, "info": info}


def _job_mem(ctx: _Ctx) -> dict:
    m = ctx.spec["method"]
    fn = ctx.method_fn(m)
    # warm-up on a few tokens: loads code paths, starts threads, sets up gloo buffers
    wt = min(ctx.tokens, 64)
    tw, gw = ctx.target_and_grad(wt)
    _step(fn, ctx.non_leaf.apply(ctx.logits(wt), ctx.anchor), tw, gw)
    del tw, gw
    z = ctx.non_leaf.apply(ctx.logits(), ctx.anchor)
    target, gout = ctx.target_and_grad()
    gc.collect()
    ctx.barrier()
    out = {"method": m, "logits_bytes": z.numel() * z.element_size()}
    meter = machine.PeakMemory(ctx.device)
    meter.start()
    loss, grad, st = _step(fn, z, target, gout)
    ctx.sync()
    out.update(meter.stop())
    del loss, grad, st
    return out


def _job_profile(ctx: _Ctx) -> dict:
    torch = _torch()
    from torch.profiler import ProfilerActivity, profile

    m = ctx.spec["method"]
    fn = ctx.method_fn(m)
    pristine = ctx.logits()
    target, gout = ctx.target_and_grad()
    _step(fn, ctx.fresh(pristine), target, gout)           # warm-up
    phases = _phase_times(ctx, fn, pristine, target, gout) if METHODS[m] is not None else None
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
    z = ctx.fresh(pristine)
    ctx.barrier()
    with profile(activities=acts, record_shapes=True) as prof:
        t0 = time.perf_counter()
        _step(fn, z, target, gout)
        ctx.sync()
        dt = time.perf_counter() - t0
    sort = "self_cuda_time_total" if ctx.device.type == "cuda" else "self_cpu_time_total"
    tables = {
        "by_op": prof.key_averages().table(sort_by=sort, row_limit=25),
        "by_op_and_shape": prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=25),
    }
    return {"seconds": dt, "tables": tables, "phases": phases} if ctx.rank == 0 else {}


_PHASES = ("_local_window", "_topk_plan", "row_sums_torch", "write_grad_torch", "_all_gather", "_all_reduce")


def _phase_times(ctx: _Ctx, fn, pristine, target, gout, runs: int = 3) -> dict:
    """Seconds per internal function of the torch path in the median of `runs` calls, without a profiler
    (wrappers around the module-level functions; 'other' = the rest of forward + backward)."""
    from megatron_rpt.loss import generalized as G

    acc, orig = {}, {}

    def wrap(name):
        f = getattr(G, name)
        orig[name] = f

        def timed(*a, **k):
            ctx.sync()
            t0 = time.perf_counter()
            r = f(*a, **k)
            ctx.sync()
            acc[name] = acc.get(name, 0.0) + time.perf_counter() - t0
            return r
        setattr(G, name, timed)

    for name in _PHASES:
        if hasattr(G, name):
            wrap(name)
    per_run = []
    try:
        for _ in range(runs):
            acc.clear()
            z = ctx.fresh(pristine)
            ctx.barrier()
            t0 = time.perf_counter()
            _step(fn, z, target, gout)
            ctx.sync()
            total = time.perf_counter() - t0
            per_run.append({**acc, "other": total - sum(acc.values()), "total": total})
            del z
    finally:
        for name, f in orig.items():
            setattr(G, name, f)
    return sorted(per_run, key=lambda r: r["total"])[len(per_run) // 2]     # the median call, all its phases


_JOBS = {"time": _job_time, "mem": _job_mem, "profile": _job_profile}


def _rank_job(rank: int, world: int, port: int, spec: dict) -> dict:
    """One rank of a job (machine.run_ranks): platform, gloo/NCCL group, TP = world, then the job."""
    from megatron_rpt.platform import setup_platform

    plat = setup_platform(force_cpu=spec["device"] == "cpu")
    torch = _torch()
    if spec["device"] == "cpu":
        from megatron_rpt.platform.compat.device_mode import ensure_device_mode

        ensure_device_mode()
        torch.set_num_threads(spec["threads"])
    else:
        torch.cuda.set_device(rank)
    torch.distributed.init_process_group(plat.backend, rank=rank, world_size=world,
                                         init_method=f"tcp://127.0.0.1:{port}",
                                         timeout=timedelta(seconds=spec["timeout"]))
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    return _JOBS[spec["job"]](_Ctx(spec, rank, world))


# =============================================================================================
# Parent side
# =============================================================================================

def run_ranks(spec: dict, world: int) -> list:
    """Run one job on `world` fresh rank processes; results ordered by rank (RuntimeError on failure)."""
    return machine.run_ranks(_rank_job, spec, world, name=f"{spec['job']} job {spec.get('method', '')}")


def _environment() -> dict:
    env = machine.describe({"torch": "torch", "megatron_core": "megatron-core"}, ["megatron_rpt/loss"])
    gen = REPO / "megatron_rpt" / "loss" / "generalized.py"
    env["git"]["generalized_py_sha256"] = hashlib.sha256(gen.read_bytes()).hexdigest() if gen.exists() else None
    return env


def _fused_available() -> bool:
    try:
        import megatron.core.fusions.fused_cross_entropy  # noqa: F401
        return True
    except Exception:  # noqa: BLE001
        return False


def _median_ms(xs):
    return statistics.median(xs) * 1e3 if xs else float("nan")


def _run_point(args, tokens: int, vocab: int, dtype: str, tp: int, methods: list, log) -> dict:
    threads = max(1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()) // tp)
    repeats = args.repeats_large if vocab >= LARGE_VOCAB and args.repeats_large else args.repeats
    base = dict(device=args.device, tokens=tokens, vocab=vocab, dtype=dtype, seed=args.seed, threads=threads,
                timeout=args.timeout, chunk_tokens=args.chunk_tokens)
    t0 = time.monotonic()
    load0 = os.getloadavg()[0]
    res = run_ranks({**base, "job": "time", "methods": methods, "repeats": repeats, "warmup": args.warmup}, tp)
    checks = res[0]["checks"]
    if any(r["failed"] for r in res):
        raise RuntimeError(f"correctness check failed at tokens={tokens} vocab={vocab} dtype={dtype} tp={tp}: "
                           + json.dumps(checks, indent=1))
    point = {"tokens": tokens, "vocab": vocab, "dtype": dtype, "tp": tp, "threads_per_rank": threads,
             "load_average_1m_timing": [load0, os.getloadavg()[0]],
             "repeats": repeats, "warmup_rounds": args.warmup, "info": res[0].get("info", {}),
             "checks": checks, "methods": {}}
    for m in methods:
        per_call = [max(r["times"][m][i] for r in res) for i in range(repeats)]   # max over ranks
        point["methods"][m] = {"time_s": {"median": statistics.median(per_call), "min": min(per_call),
                                          "max": max(per_call), "all": per_call}}
    modes = [] if args.no_memory else (["cuda"] if args.device == "cuda" else
                                       {"both": ["fixed", "default"], "fixed": ["fixed"], "default": ["default"]}[
                                           args.malloc_large if vocab >= LARGE_VOCAB else args.malloc])
    for mode in modes:
        key = "memory_default_malloc" if mode == "default" and len(modes) > 1 else "memory"
        for m in methods:
            mres = run_ranks({**base, "job": "mem", "method": m, "malloc": mode}, tp)
            worst = max(mres, key=lambda r: r["extra_bytes"])
            point["methods"][m][key] = {
                "extra_bytes": worst["extra_bytes"], "logits_bytes_per_rank": worst["logits_bytes"],
                "per_rank_extra_bytes": [r["extra_bytes"] for r in mres],
                "how": worst["method_used"], "malloc": "n/a" if mode == "cuda" else (
                    "glibc mmap threshold fixed at 64 KiB" if all(r["malloc_fixed"] for r in mres) else "default"),
                "hwm_reset": worst.get("hwm_reset"),
                "contaminated": any(r.get("contaminated") for r in mres)}
    bt = point["methods"][BASELINE]["time_s"]["median"] if BASELINE in methods else None
    for m in methods:
        e = point["methods"][m]
        if bt:
            e["time_ratio"] = e["time_s"]["median"] / bt
            e["time_ratio_min"] = e["time_s"]["min"] / point["methods"][BASELINE]["time_s"]["min"]
        for key in ("memory", "memory_default_malloc"):
            bm = point["methods"].get(BASELINE, {}).get(key)
            if bm and key in e:
                mm = e[key]
                mm["extra_ratio"] = mm["extra_bytes"] / bm["extra_bytes"] if bm["extra_bytes"] > 0 else None
                mm["peak_ratio"] = ((mm["logits_bytes_per_rank"] + mm["extra_bytes"])
                                    / (bm["logits_bytes_per_rank"] + bm["extra_bytes"]))
    point["wall_s"] = time.monotonic() - t0
    log(_point_lines(point))
    return point


def _fmt_ratio(x):
    return "-" if x is None else f"{x:.2f}x"


def _point_lines(p: dict) -> str:
    lines = [f"tokens={p['tokens']} vocab={p['vocab']} dtype={p['dtype']} tp={p['tp']} "
             f"(threads/rank {p['threads_per_rank']}, {p['repeats']} repeats, {p['wall_s']:.0f} s, "
             f"load average {p['load_average_1m_timing'][0]:.1f} -> {p['load_average_1m_timing'][1]:.1f} while timing)"]
    for m, e in p["methods"].items():
        mem = e.get("memory")
        mtxt = "" if not mem else (f"  extra {mem['extra_bytes'] / 2**20:8.1f} MiB  extra {_fmt_ratio(mem.get('extra_ratio'))}"
                                   f"  peak {_fmt_ratio(mem.get('peak_ratio'))}")
        dm = e.get("memory_default_malloc")
        if dm:
            mtxt += f"  | default malloc: extra {dm['extra_bytes'] / 2**20:8.1f} MiB  peak {_fmt_ratio(dm.get('peak_ratio'))}"
        lines.append(f"  {m:15s} {e['time_s']['median'] * 1e3:9.1f} ms  {_fmt_ratio(e.get('time_ratio')):>7s}{mtxt}")
    return "\n".join(lines)


def _markdown(doc: dict) -> str:
    env, st = doc["environment"], doc["settings"]
    mach, ver = env["machine"], env["versions"]
    gb = (mach["memory_bytes"] or 0) / 2**30
    out = [f"# Loss benchmark ({doc['device']}): generalized beta/lambda loss vs Megatron-Core cross-entropy", ""]
    out += [f"- Date: {doc['date']}",
            f"- Machine: {mach['cpu_model']}, {mach['cores_available']} cores available, {gb:.0f} GiB RAM, {mach['os']}"
            + (f"; GPU {doc['results'][0]['info'].get('gpu')}" if doc["results"] and doc["results"][0]["info"].get("gpu") else ""),
            f"- Versions: torch {ver['torch']}, megatron-core {ver['megatron_core']}, Python {ver['python']}",
            f"- Code: commit `{env['git']['commit'][:12]}`, megatron_rpt/loss/ "
            + ("**with uncommitted changes**" if env["git"].get("modified", env["git"].get("generalized_py_modified")) else "as committed")
            + f" (generalized.py sha256 `{(env['git']['generalized_py_sha256'] or '')[:12]}`)",
            f"- Command: `{doc['command']}`",
            f"- Total wall time: {doc['wall_s'] / 60:.1f} min; 1-minute load average at start {doc['load_average_1m']['start']:.1f}, "
            f"at the end {doc['load_average_1m']['end']:.1f} (this benchmark keeps about `cores` busy by itself)",
            ""]
    out += ["Methods:", ""] + [f"- `{m}`: {METHOD_TEXT[m]}" for m in st["methods"]]
    out += [f"- our loss: impl='auto' (torch path on CPU), overwrite_logits=True (as the model's per-token head calls "
            "it in training: fp32 logits are overwritten with exp(z - m), then the gradient), inplace_backward=True, chunk_tokens="
            + (str(st["chunk_tokens"]) if st.get("chunk_tokens") else "default (16 MiB of fp32 per temporary)"), ""]
    out += ["How it was measured:", "",
            f"- Time: forward + backward (`loss = fn(logits, target)`; `torch.autograd.grad(loss, logits, grad_output)`, "
            "random grad_output) on non-leaf logits, refilled from a pristine copy before every call (outside the timed region). "
            f"Median of the repeats column (vocab >= {LARGE_VOCAB}: {st['repeats_large'] or st['repeats']} repeats, else {st['repeats']}); "
            "every round runs all methods once (rotated order); a correctness round before the timed rounds doubles as warm-up"
            + (f", plus {st['warmup']} untimed round(s)" if st["warmup"] else "") + ". "
            "TP=2: two gloo ranks on this machine, each with V/2 and cores/2 intra-op threads; barrier before each call; time = max over ranks.",
            ]
    if doc["device"] == "cpu":
        out += ["- Memory: each (grid point, method) in a fresh forked process (the parent only imported the libraries): "
                "small warm-up call, logits generated in place, peak-RSS mark reset (`/proc/self/clear_refs`=5), "
                "VmRSS read, loss + backward, peak = max(ru_maxrss, VmHWM). **extra** = peak - RSS before the call "
                "(bytes over the logits and the other inputs), max over ranks. **extra x** = extra / baseline's extra; "
                "**peak x** = (logits + extra) / (logits + baseline's extra), per rank. RSS is page- and "
                "allocator-granular: differences below ~1 MiB are noise, and a near-zero baseline extra (fp32: Megatron works "
                "in place) makes **extra x** meaningless; **peak x** is the figure to hold against the target.",
                "- Two allocator settings, each in its own processes: **extra** / **peak x** with glibc's mmap threshold fixed at "
                "64 KiB (`mallopt(M_MMAP_THRESHOLD)`: every large block is mmapped and unmapped on free, so RSS follows the "
                "bytes actually live, the CPU analogue of `max_memory_allocated`); **extra, default malloc** / **peak x, default "
                "malloc** with glibc as it comes (its dynamic threshold moves freed blocks of up to 32 MiB onto the heap, which "
                "keeps them resident: what a CPU training process actually holds, allocator retention and fragmentation included)."]
    else:
        out += ["- Memory: each (grid point, method) in a fresh spawned process: `torch.cuda.max_memory_allocated` after "
                "`reset_peak_memory_stats`, minus `memory_allocated` before the call (logits and inputs allocated); max over ranks. "
                "**extra x** = extra / baseline's extra; **peak x** = (logits + extra) / (logits + baseline's extra)."]
    out += [f"- Inputs: logits ~ N(0, {LOGIT_STD:g}^2) per rank (own seed), shape [tokens, 1, V/TP], targets uniform, no padded vocabulary.",
            f"- Targets (owner's): time <= {TARGET_TIME_RATIO}x and peak memory <= {TARGET_MEM_RATIO}x of `{BASELINE}` "
            f"(the targets column counts extra bytes within {MEM_RESOLUTION >> 20} MiB of the baseline's as equal: "
            "the resolution of RSS).",
            ""]
    dm_cols = any("memory_default_malloc" in e for p in doc["results"] for e in p["methods"].values())
    out += ["**time x** = median / baseline's median (what the targets column judges); **x of min** = fastest call / "
            "baseline's fastest call (less sensitive to other load on the machine).", ""]
    out += ["| tokens | vocab | dtype | TP | method | time median (ms) | min-max (ms) | time x | x of min | extra (MiB) | extra x | peak x | "
            + ("extra, default malloc (MiB) | peak x, default malloc | " if dm_cols else "") + "targets |",
            "|---:|---:|:--|---:|:--|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if dm_cols else "") + ":--|"]
    for p in doc["results"]:
        for m, e in p["methods"].items():
            t = e["time_s"]
            mem = e.get("memory") or {}
            tr, pr = e.get("time_ratio"), mem.get("peak_ratio")
            if m.startswith("mcore"):
                verdict = "baseline" if m == BASELINE else ""
            else:
                bits = []
                if tr is not None:
                    bits.append("time ok" if tr <= TARGET_TIME_RATIO else "**time**")
                if pr is not None:
                    base_extra = p["methods"][BASELINE]["memory"]["extra_bytes"]
                    within = mem["extra_bytes"] - base_extra <= MEM_RESOLUTION
                    bits.append("mem ok" if pr <= TARGET_MEM_RATIO + 1e-9 or within else "**mem**")
                verdict = ", ".join(bits)
            extra = f"{mem['extra_bytes'] / 2**20:.1f}" if mem else "-"
            dmtxt = ""
            if dm_cols:
                dm = e.get("memory_default_malloc") or {}
                dmtxt = (f"{dm['extra_bytes'] / 2**20:.1f} | " if dm else "- | ") + f"{_fmt_ratio(dm.get('peak_ratio'))} | "
            base_min = p["methods"].get(BASELINE, {}).get("time_s", {}).get("min")
            trm = t["min"] / base_min if base_min else None
            out.append(f"| {p['tokens']} | {p['vocab']} | {p['dtype']} | {p['tp']} | `{m}` | {t['median'] * 1e3:.1f} | "
                       f"{t['min'] * 1e3:.0f}-{t['max'] * 1e3:.0f} | {_fmt_ratio(tr)} | {_fmt_ratio(trm)} | {extra} | "
                       f"{_fmt_ratio(mem.get('extra_ratio'))} | {_fmt_ratio(pr)} | {dmtxt}{verdict} |")
    out += ["", "Logits bytes per rank: " + "; ".join(
        f"{p['vocab']}/{p['dtype']}/TP{p['tp']}: {next(iter(p['methods'].values())).get('memory', {}).get('logits_bytes_per_rank', 0) / 2**20:.0f} MiB"
        for p in doc["results"]), ""]
    out += ["Correctness (checked in the same run before timing; max abs diff, max over ranks): `ours_ce` vs `mcore_ce` over all "
            f"tokens and the full vocabulary; every method vs a float64 autograd reference on {N_SAMPLE} sampled tokens.", "",
            "| tokens | vocab | dtype | TP | ours_ce vs mcore: loss | grad | worst method vs float64 ref: loss | grad | stats |",
            "|---:|---:|:--|---:|---:|---:|---:|---:|---:|"]
    for p in doc["results"]:
        c = p["checks"]
        ce = c.get("ours_ce", {})
        rl = max(v["ref_loss_maxabs"] for v in c.values())
        rg = max(v["ref_grad_maxabs"] for v in c.values())
        rs = max([x for v in c.values() for k, x in v.items() if k.startswith("ref_stat_")] or [float("nan")])
        out.append(f"| {p['tokens']} | {p['vocab']} | {p['dtype']} | {p['tp']} | {ce.get('vs_mcore_loss_maxabs', float('nan')):.2e} | "
                   f"{ce.get('vs_mcore_grad_maxabs', float('nan')):.2e} | {rl:.2e} | {rg:.2e} | {rs:.2e} |")
    out += ["", "Per grid point: timed repeats, threads per rank, 1-minute load average before and after the timing job "
            f"(the machine has {mach['cores_available']} cores; the benchmark itself accounts for about that many), wall time.", "",
            "| tokens | vocab | dtype | TP | repeats | threads/rank | load avg while timing | wall (s) |",
            "|---:|---:|:--|---:|---:|---:|:--|---:|"]
    for p in doc["results"]:
        la = p.get("load_average_1m_timing") or [float("nan")] * 2
        out.append(f"| {p['tokens']} | {p['vocab']} | {p['dtype']} | {p['tp']} | {p['repeats']} | {p['threads_per_rank']} | "
                   f"{la[0]:.1f} -> {la[1]:.1f} | {p['wall_s']:.0f} |")
    if doc.get("notes"):
        out += ["", *doc["notes"]]
    return "\n".join(out) + "\n"


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--tokens", type=int, nargs="+", default=[4096], help="tokens per step (s*b)")
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936], help="global (padded) vocabulary sizes")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="tensor-parallel sizes (ranks on this machine)")
    p.add_argument("--dtype", choices=sorted(DTYPES), nargs="+", default=["fp32", "bf16"], help="logits dtype")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    p.add_argument("--repeats-large", type=int, default=3,
                   help=f"timed rounds for vocab >= {LARGE_VOCAB} (0: use --repeats)")
    p.add_argument("--warmup", type=int, default=0,
                   help="untimed rounds after the correctness round (which already runs every method once)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=None,
                   help="default: all (mcore_fused_ce only on CUDA when importable); the baseline is always included")
    p.add_argument("--no-memory", action="store_true", help="skip the per-method memory processes")
    p.add_argument("--malloc", choices=("both", "fixed", "default"), default="both",
                   help="CPU memory runs: 'fixed' = glibc mmap threshold fixed at 64 KiB (RSS follows live bytes), "
                        "'default' = glibc as configured (RSS includes what the heap retains), 'both' (default)")
    p.add_argument("--malloc-large", choices=("both", "fixed", "default"), default="fixed",
                   help=f"--malloc for vocab >= {LARGE_VOCAB} (default: fixed only, to keep the full grid short)")
    p.add_argument("--chunk-tokens", type=int, default=None,
                   help="chunk_tokens passed to our loss (default: the function's own default, 16 MiB of fp32 per temporary)")
    p.add_argument("--note", action="append", default=[], help="a line of text for the results' notes (repeatable)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--timeout", type=int, default=1800, help="seconds per job")
    p.add_argument("--output", default=None,
                   help="output path prefix (default benchmarks/results/loss_<device>): writes <prefix>.json and <prefix>.md")
    p.add_argument("--render", metavar="JSON", default=None,
                   help="only rewrite the markdown next to this results JSON (adding any --note lines to both); runs nothing")
    p.add_argument("--profile", choices=[m for m in METHODS], default=None,
                   help="profile one call of this method at the first grid point with torch.profiler, print op tables, write nothing")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.repeats_large < 0 or args.warmup < 0:
        p.error("--repeats >= 1, --repeats-large >= 0, --warmup >= 0")
    for v in args.vocab:
        for tp in args.tp:
            if v % tp:
                p.error(f"--vocab {v} is not divisible by --tp {tp}")
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    t_start = time.monotonic()

    def log(msg):
        print(msg, flush=True)

    if args.render:
        log(f"wrote {machine.rerender(Path(args.render), _markdown, args.note)}")
        return 0

    if args.device == "cpu":
        # Platform layer before megatron.core is imported; forked ranks inherit both (no compute here:
        # the parent must not start OpenMP threads or a process group before forking).
        from megatron_rpt.platform import setup_platform

        setup_platform(force_cpu=True)
        import megatron.core.parallel_state  # noqa: F401
        import megatron.core.tensor_parallel  # noqa: F401
        import megatron_rpt.loss  # noqa: F401
    if args.profile:
        spec = dict(device=args.device, tokens=args.tokens[0], vocab=args.vocab[0], dtype=args.dtype[0],
                    seed=args.seed, timeout=args.timeout, job="profile", method=args.profile, chunk_tokens=args.chunk_tokens,
                    threads=max(1, len(os.sched_getaffinity(0)) // args.tp[0]))
        res = run_ranks(spec, args.tp[0])[0]
        log(f"profile {args.profile}: tokens={spec['tokens']} vocab={spec['vocab']} dtype={spec['dtype']} tp={args.tp[0]}: "
            f"{res['seconds'] * 1e3:.1f} ms (rank 0, under the profiler)")
        if res.get("phases"):
            log("phase times without the profiler (the median of 3 calls, rank 0; generalized.py functions):")
            for k, v in res["phases"].items():
                log(f"  {k:18s} {v * 1e3:9.1f} ms")
        log("(op tables below: the profiler itself slows the chunked path down; use them for shares, not totals)")
        for name, table in res["tables"].items():
            log(f"\n== {name} ==\n{table}")
        return 0

    methods = args.methods or [m for m in METHODS if m != "mcore_fused_ce"
                               or (args.device == "cuda" and _fused_available())]
    if BASELINE not in methods:
        methods = [BASELINE] + methods
    methods = [m for m in METHODS if m in methods]          # canonical order, baseline first
    prefix = Path(args.output) if args.output else REPO / "benchmarks" / "results" / f"loss_{args.device}"
    command = shlex.join(["python", "benchmarks/loss.py", *(sys.argv[1:] if argv is None else argv)])
    env = _environment()
    load_start = os.getloadavg()
    if load_start[0] > env["machine"]["cores_available"] * 0.5:
        log(f"warning: load average {load_start[0]:.1f} on {env['machine']['cores_available']} cores: "
            "other processes are running; timings will be noisy")
    results = []
    for tokens in args.tokens:
        for vocab in args.vocab:
            for dtype in args.dtype:
                for tp in args.tp:
                    results.append(_run_point(args, tokens, vocab, dtype, tp, methods, log))
    doc = {
        "benchmark": "loss", "device": args.device,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command, "environment": env,
        "settings": {"methods": methods, "method_definitions": {m: METHOD_TEXT[m] for m in methods},
                     "repeats": args.repeats, "repeats_large": args.repeats_large, "large_vocab_from": LARGE_VOCAB,
                     "warmup": args.warmup, "seed": args.seed, "chunk_tokens": args.chunk_tokens, "logit_std": LOGIT_STD, "baseline": BASELINE,
                     "target_time_ratio": TARGET_TIME_RATIO, "target_peak_memory_ratio": TARGET_MEM_RATIO},
        "results": results,
        "wall_s": time.monotonic() - t_start,
        "load_average_1m": {"start": load_start[0], "end": os.getloadavg()[0]},
        "notes": [f"Note: {n}" for n in args.note],
    }
    json_path, md_path = machine.write_results(prefix, doc, _markdown)
    log(f"wrote {json_path} and {md_path} ({doc['wall_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
