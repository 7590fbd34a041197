"""Benchmark: one full training step with our loss against Megatron-Core's own language-model loss.

What is measured, per grid point (logits dtype x TP size), side by side in the same run, on the same
model, batch and optimizer: peak memory and wall time of one complete training step
(`megatron_rpt.training.step.train_step`: zero grads, forward + backward through Megatron-Core's
schedule, finite-gradient check, optimizer step) of a small GPT with a large vocabulary, where the
output layer and the loss dominate:

  mcore_ce    baseline: labels passed into GPTModel, whose compute_language_model_loss runs
              Megatron-Core's vocab_parallel_cross_entropy on the [s, b, V/TP] logits (exactly
              Megatron-LM's pretrain_gpt path; `ForwardStep(None, ...)`)
  ours_ce     --loss-function generalized at zero settings (cross-entropy), run as the model's
              per-token head (`models.gpt.token_head`), as `mrpt-pretrain` runs it
  ours_beta   --loss-beta -0.25
  ours_low    --loss-lambda-low -0.1 --loss-topk 100 (the paper's top-k setting)

Every method runs in fresh processes (forked on CPU, one per rank, TP = ranks): `setup_job` builds
the model and optimizer exactly as `mrpt-pretrain` does (mock data flags, NullTokenizer), then the
same fixed micro-batch (random tokens, every position a loss token) feeds every step.

* Time: per process `--warmup` untimed steps, then `--steps` timed steps (each the max over
  ranks); `--rounds` processes per method, the methods' order rotated each round; the median over
  all timed steps of a method.
* Memory: a separate process per method with glibc's mmap threshold fixed at 64 KiB (RSS follows
  the bytes actually live; CPU) runs the warm-up steps (so optimizer state and grad buffers exist),
  then one step under `machine.PeakMemory`: the peak over the RSS before that step (CUDA:
  max_memory_allocated over memory_allocated before it); max over ranks.
* Correctness: the losses of the first step must agree across methods (CE-valued methods to 1e-5
  relative of the baseline's; beta/top-k methods differ by design and are only checked finite).

Targets (owner's): peak memory <= 1.0x and step time <= 1.05x of mcore_ce at CE and beta,
<= 1.1x with top-k.

Usage (defaults: the full grid; writes benchmarks/results/train_step_<device>.json and .md):

    python benchmarks/train_step.py
    python benchmarks/train_step.py --dtype fp32 --tp 1 --steps 2 --seq-length 256 --output /tmp/ts   # quick
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import machine  # benchmarks/machine.py
from megatron_rpt.config.arguments import model_flags_argv
from megatron_rpt.config.presets import QWEN3_FAMILY

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BASELINE = "mcore_ce"
# name -> extra mrpt-pretrain flags (None: Megatron-Core's own LM loss)
METHODS = {
    "mcore_ce": None,
    "ours_ce": [],
    "ours_beta": ["--loss-beta", "-0.25"],
    "ours_low": ["--loss-lambda-low", "-0.1", "--loss-topk", "100"],
}
METHOD_TEXT = {
    "mcore_ce": "labels into GPTModel -> Megatron-Core compute_language_model_loss -> vocab_parallel_cross_entropy (baseline)",
    "ours_ce": "generalized loss at zero settings as the model's per-token head",
    "ours_beta": "generalized loss, beta=-0.25",
    "ours_low": "generalized loss, lambda_low=-0.1, top_k=100",
}
TARGETS = {"mcore_ce": None, "ours_ce": (1.05, 1.0), "ours_beta": (1.05, 1.0), "ours_low": (1.1, 1.0)}  # (time, peak)
DTYPE_FLAGS = {"fp32": [], "bf16": ["--bf16"]}


def _argv(spec: dict) -> list:
    m = spec["model"]
    argv = [*model_flags_argv(QWEN3_FAMILY), "--num-layers", str(m["layers"]), "--hidden-size", str(m["hidden"]), "--ffn-hidden-size", str(m["ffn"]),
            "--num-attention-heads", str(m["heads"]), "--num-query-groups", str(m["heads"]),
            "--seq-length", str(spec["seq_length"]), "--max-position-embeddings", str(spec["seq_length"]),
            "--micro-batch-size", str(spec["micro_batch"]), "--global-batch-size", str(spec["micro_batch"]),
            "--vocab-size", str(spec["vocab"]), "--mock-data", "--lr", "1e-4", "--train-iters", "100",
            "--tensor-model-parallel-size", str(spec["tp"]), "--seed", str(spec["seed"])]
    if spec["device"] == "cpu":
        argv.append("--use-cpu")
    if spec["tp"] > 1:
        argv.append("--sequence-parallel")
    return argv + DTYPE_FLAGS[spec["dtype"]] + (METHODS[spec["method"]] or [])


def _rank_job(rank: int, world: int, port: int, spec: dict) -> dict:
    """One rank: the job as mrpt-pretrain sets it up, then warm-up, timed / measured steps."""
    import torch

    from megatron_rpt.config import parse_args
    from megatron_rpt.loss import get_loss_function
    from megatron_rpt.training.setup import setup_job
    from megatron_rpt.training.step import make_forward_step, train_step

    cfg = parse_args(_argv(spec))
    job = setup_job(cfg, check_data=False)
    if spec["device"] == "cpu":
        torch.set_num_threads(spec["threads"])
    loss_fn = None if METHODS[spec["method"]] is None else get_loss_function(cfg, job.tokenizer.vocab_size)
    forward_step = make_forward_step(loss_fn, job.device)
    b, s = spec["micro_batch"], spec["seq_length"]
    gen = torch.Generator().manual_seed(spec["seed"])
    tokens = torch.randint(0, spec["vocab"], (b, s + 1), generator=gen)
    batch = {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
             "loss_mask": torch.ones(b, s), "position_ids": torch.arange(s).expand(b, s).contiguous()}
    if not job.platform.transformer_engine:
        batch["attention_mask"] = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)
    data = [itertools.repeat(batch)]

    def step():
        out = train_step(job.state, data, forward_step, num_microbatches=1, seq_length=s, micro_batch_size=b,
                         global_batch_size=b, device=job.device)
        if job.device.type == "cuda":
            torch.cuda.synchronize(job.device)
        return out

    losses, times = [], []
    for _ in range(spec["warmup"]):
        losses.append(step().loss)
    gc.collect()
    result = {"first_loss": losses[0] if losses else None}
    if spec["job"] == "mem":
        meter = machine.PeakMemory(job.device)
        meter.start()
        losses.append(step().loss)
        result.update(meter.stop())
    else:
        for _ in range(spec["steps"]):
            torch.distributed.barrier()
            t0 = time.perf_counter()
            losses.append(step().loss)
            times.append(time.perf_counter() - t0)
        result["times"] = times
    result["losses"] = losses
    result["logits_bytes_per_rank"] = (b * s * (job.vocab_size // spec["tp"])
                                       * (2 if spec["dtype"] == "bf16" else 4))
    return result


# =============================================================================================
# Parent side
# =============================================================================================

def _run_point(args, dtype: str, tp: int, log) -> dict:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    base = dict(device=args.device, dtype=dtype, tp=tp, vocab=args.vocab, seq_length=args.seq_length,
                micro_batch=args.micro_batch, seed=args.seed, threads=max(1, cores // tp), timeout=args.timeout,
                warmup=args.warmup, steps=args.steps,
                model=dict(layers=args.num_layers, hidden=args.hidden_size, ffn=4 * args.hidden_size, heads=4))
    t0 = time.monotonic()
    point = {"dtype": dtype, "tp": tp, "threads_per_rank": base["threads"], "methods": {},
             "load_average_1m": [os.getloadavg()[0]]}
    steps = {m: [] for m in args.methods}
    for rnd in range(args.rounds):
        # rounds rotate the order, so a slow spell of a shared machine does not land on one method
        shift = rnd % len(args.methods)
        for m in args.methods[shift:] + args.methods[:shift]:
            res = machine.run_ranks(_rank_job, {**base, "method": m, "job": "time"}, tp, name=f"time job {m}")
            steps[m] += [max(r["times"][i] for r in res) for i in range(args.steps)]     # max over ranks
            point["methods"].setdefault(m, {"losses": res[0]["losses"]})
    for m in args.methods:
        per_step = steps[m]
        e = point["methods"][m]
        e["time_s"] = {"median": statistics.median(per_step), "min": min(per_step), "max": max(per_step),
                       "all": per_step}
        if not args.no_memory:
            mres = machine.run_ranks(_rank_job, {**base, "method": m, "job": "mem",
                                                 "malloc": "fixed" if args.device == "cpu" else None}, tp,
                                     name=f"memory job {m}")
            worst = max(mres, key=lambda r: r["extra_bytes"])
            e["memory"] = {"extra_bytes": worst["extra_bytes"], "per_rank_extra_bytes": [r["extra_bytes"] for r in mres],
                           "logits_bytes_per_rank": worst["logits_bytes_per_rank"], "how": worst["method_used"],
                           "before_bytes": worst["before_bytes"],
                           "contaminated": any(r.get("contaminated") for r in mres)}
    point["load_average_1m"].append(os.getloadavg()[0])
    _check(point)
    b = point["methods"].get(BASELINE)
    for m, e in point["methods"].items():
        if b:
            e["time_ratio"] = e["time_s"]["median"] / b["time_s"]["median"]
            if "memory" in e and "memory" in b:
                mm, bm = e["memory"], b["memory"]
                mm["extra_ratio"] = mm["extra_bytes"] / bm["extra_bytes"] if bm["extra_bytes"] > 0 else None
                mm["peak_ratio"] = (mm["before_bytes"] + mm["extra_bytes"]) / (bm["before_bytes"] + bm["extra_bytes"])
    point["wall_s"] = time.monotonic() - t0
    log(_point_lines(point))
    return point


def _check(point: dict) -> None:
    """The first step's loss: CE-valued methods equal the baseline's to 1e-5 relative; all finite."""
    import math
    ref = point["methods"].get(BASELINE, {}).get("losses", [None])[0]
    bad = []
    for m, e in point["methods"].items():
        first = e["losses"][0]
        if not all(math.isfinite(x) for x in e["losses"]):
            bad.append(f"{m}: non-finite loss {e['losses']}")
        elif ref is not None and m in ("ours_ce",) and abs(first - ref) > 1e-5 * abs(ref):
            bad.append(f"{m}: first loss {first!r} vs {BASELINE} {ref!r}")
    point["check"] = "ok" if not bad else bad
    if bad:
        raise RuntimeError("correctness check failed at dtype={dtype} tp={tp}: ".format(**point) + "; ".join(bad))


def _verdict(m: str, e: dict) -> str:
    t = TARGETS.get(m)
    if t is None:
        return "baseline"
    parts = ["time ok" if e.get("time_ratio", 9) <= t[0] else "**time**"]
    pr = e.get("memory", {}).get("peak_ratio")
    if pr is not None:
        parts.append("mem ok" if pr <= t[1] + 0.005 else "**mem**")   # RSS granularity: within 0.5%
    return ", ".join(parts)


def _ratio(x) -> str:
    return "-" if x is None else f"{x:.3f}x"


def _point_lines(p: dict) -> str:
    lines = [f"dtype={p['dtype']} tp={p['tp']} (threads/rank {p['threads_per_rank']}, {p['wall_s']:.0f} s)"]
    for m, e in p["methods"].items():
        mem = e.get("memory")
        lines.append(f"  {m:<10} step {e['time_s']['median'] * 1e3:8.0f} ms  {e.get('time_ratio', float('nan')):.3f}x"
                     + (f"  step extra {mem['extra_bytes'] / 2**20:8.1f} MiB  {_ratio(mem.get('extra_ratio'))}"
                        f"  peak {_ratio(mem.get('peak_ratio'))}" if mem else "") + f"  {_verdict(m, e)}")
    return "\n".join(lines)


def _markdown(doc: dict) -> str:
    env, st = doc["environment"], doc["settings"]
    mach, ver = env["machine"], env["versions"]
    out = [f"# Training-step benchmark ({st['device']}): our loss vs Megatron-Core's own LM loss", "",
           f"- Date: {doc['date']}",
           f"- Machine: {mach['cpu_model']}, {mach['cores_available']} cores available, "
           f"{(mach['memory_bytes'] or 0) / 2**30:.0f} GiB RAM, {mach['os']}",
           f"- Versions: torch {ver.get('torch')}, megatron-core {ver.get('megatron_core')}, Python {ver['python']}",
           f"- Code: commit `{env['git']['commit'][:12]}`"
           + (", **with uncommitted changes**" if env["git"]["modified"] else ", as committed"),
           f"- Command: `{doc['command']}`",
           f"- Total wall time: {doc['wall_s'] / 60:.1f} min", "",
           f"Model: {st['num_layers']} layers, hidden {st['hidden_size']}, 4 heads, vocabulary {st['vocab']}; "
           f"micro-batch {st['micro_batch']} x {st['seq_length']} tokens (one micro-batch per step); Adam "
           f"(mrpt-pretrain defaults); TP > 1 with sequence parallelism. Time: {st.get('rounds', 1)} processes per "
           f"method (order rotated each round), each {st['warmup']} warm-up steps then {st['steps']} timed steps "
           "(a step's time is the max over ranks); the median over all timed steps. Memory: one more step after "
           "the warm-up in a separate process per method.", "",
           "Methods:", ""] + [f"- `{m}`: {METHOD_TEXT[m]}" for m in st["methods"]]
    out += ["", "**step extra** = the step's peak memory over what was resident before it (model, gradient "
            "buffers, optimizer state; CPU: RSS with glibc's mmap threshold fixed at 64 KiB, so RSS follows live "
            "bytes; CUDA: max_memory_allocated over memory_allocated), max over ranks; **extra x** = that over the "
            "baseline's; **peak x** = (resident before + step extra) / the baseline's: the process's peak. "
            "**time x** = median step / baseline's median step. Targets (owner's): time <= 1.05x and peak <= 1.0x "
            "at CE and beta, <= 1.1x time with top-k.", "",
            "| dtype | TP | method | step median (ms) | min-max (ms) | time x | step extra (MiB) | extra x | peak x | resident before (MiB) | logits/rank (MiB) | first-step loss | targets |",
            "|:--|---:|:--|---:|---:|---:|---:|---:|---:|---:|---:|---:|:--|"]
    for p in doc["results"]:
        for m, e in p["methods"].items():
            mem = e.get("memory") or {}
            t = e["time_s"]
            out.append(f"| {p['dtype']} | {p['tp']} | `{m}` | {t['median'] * 1e3:.0f} | {t['min'] * 1e3:.0f}-{t['max'] * 1e3:.0f} | "
                       f"{e.get('time_ratio', float('nan')):.3f}x | "
                       + (f"{mem['extra_bytes'] / 2**20:.1f} | {_ratio(mem.get('extra_ratio'))} | "
                          f"{_ratio(mem.get('peak_ratio'))} | {mem['before_bytes'] / 2**20:.0f} | "
                          f"{mem['logits_bytes_per_rank'] / 2**20:.0f} | " if mem else "- | - | - | - | - | ")
                       + f"{e['losses'][0]:.6f} | {_verdict(m, e)} |")
    out += ["", "| dtype | TP | threads/rank | load average (start -> end) | wall (s) |", "|:--|---:|---:|:--|---:|"]
    for p in doc["results"]:
        la = p["load_average_1m"]
        out.append(f"| {p['dtype']} | {p['tp']} | {p['threads_per_rank']} | {la[0]:.1f} -> {la[1]:.1f} | {p['wall_s']:.0f} |")
    if doc.get("notes"):
        out += ["", *doc["notes"]]
    return "\n".join(out) + "\n"


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPE_FLAGS), nargs="+", default=["fp32", "bf16"])
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="tensor-parallel sizes (ranks on this machine)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (>= 1: optimizer state exists)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per process (median of all reported)")
    p.add_argument("--rounds", type=int, default=2,
                   help="time processes per method, the methods' order rotated each round")
    p.add_argument("--no-memory", action="store_true", help="skip the memory processes")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--timeout", type=int, default=1800, help="seconds per job")
    p.add_argument("--note", action="append", default=[], help="a line for the results' notes (repeatable)")
    p.add_argument("--output", default=None,
                   help="output path prefix (default benchmarks/results/train_step_<device>): <prefix>.json and .md")
    p.add_argument("--render", metavar="JSON", default=None,
                   help="only rewrite the markdown next to this results JSON (adding any --note lines); runs nothing")
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        p.error("--warmup, --steps and --rounds must be >= 1")
    if BASELINE not in args.methods:
        args.methods = [BASELINE] + args.methods
    args.methods = [m for m in METHODS if m in args.methods]
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    if args.render:
        print(f"wrote {machine.rerender(Path(args.render), _markdown, args.note)}")
        return 0
    t0 = time.monotonic()
    results = []
    for dtype in args.dtype:
        for tp in args.tp:
            results.append(_run_point(args, dtype, tp, print))
    doc = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO)] + (argv or sys.argv[1:])),
           "environment": machine.describe({"torch": "torch", "megatron_core": "megatron-core"},
                                           ["megatron_rpt", "benchmarks/train_step.py"]),
           "settings": {k: getattr(args, k) for k in ("device", "vocab", "num_layers", "hidden_size", "seq_length",
                                                      "micro_batch", "warmup", "steps", "rounds", "methods", "dtype",
                                                      "tp")},
           "results": results, "wall_s": time.monotonic() - t0, "notes": [f"Note: {n}" for n in args.note]}
    prefix = Path(args.output) if args.output else REPO / "benchmarks" / "results" / f"train_step_{args.device}"
    j, md = machine.write_results(prefix, doc, _markdown)
    print(f"wrote {j} and {md} ({doc['wall_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
