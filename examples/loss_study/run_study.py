"""Small-scale study of the generalized loss: does the paper's mechanism show on the `tiny` model?

Pretrains the `tiny` preset on the demo corpus (examples/cpu_demo.py's data) once per setting of
"Diversity or Precision?" (k = 100): CE, beta = -0.25, beta = 0.5, lambda_low = -0.1,
lambda_high = 0.1; identical seed, data order and schedule. Every `--log-interval` iterations the
loss's vocab-parallel statistics (cross-entropy, entropy of pi, pi(target), top-k and tail mass)
are recorded; the validation set is evaluated at the same points. Writes, under --output-dir:
<setting>.json (the curves), study.png (plot) and study.md (table); a setting whose JSON exists is
not trained again (delete it to rerun). The committed results are in results/ next to this script.

    python examples/loss_study/run_study.py [--train-iters 600] [--parallel 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))

SETTINGS = {   # name: loss flags (paper's settings, k = 100)
    "ce": [],
    "beta=-0.25": ["--loss-beta", "-0.25"],
    "beta=0.5": ["--loss-beta", "0.5"],
    "lambda_low=-0.1": ["--loss-lambda-low", "-0.1"],
    "lambda_high=0.1": ["--loss-lambda-high", "0.1"],
}
STATS = ("cross_entropy", "entropy", "target_prob", "top1", "topk_mass", "tail_mass")


def train_argv(args, tok_model: Path, document: Path, setting: str) -> list[str]:
    return ["--model-preset", "tiny", "--micro-batch-size", "8", "--global-batch-size", "8",
            "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "20",
            "--train-iters", str(args.train_iters), "--weight-decay", "0.1", "--clip-grad", "1.0",
            "--adam-beta2", "0.95", "--data-path", str(document), "--split", "98,2,0",
            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(tok_model),
            "--log-interval", str(args.log_interval), "--eval-interval", str(args.eval_interval),
            "--eval-iters", "8", "--seed", "1234", "--loss-topk", "100", "--no-log-memory",
            "--tensorboard-dir", str(Path(args.output_dir).resolve() / "tensorboard" / setting),
            *SETTINGS[setting]]


def run_one(args) -> None:
    """Child process: one single-rank pretraining run in-process; its curves go to JSON."""
    from megatron_rpt.config import parse_args
    from megatron_rpt.training.loop import pretrain
    argv = json.loads(args.argv)
    t0 = time.perf_counter()
    r = pretrain(parse_args(argv))
    out = {"setting": args.run_one, "argv": argv, "seconds": time.perf_counter() - t0,
           "losses": r.losses, "train": r.distribution, "valid": r.valid_distribution,
           "valid_loss": r.valid_losses}
    Path(args.json).write_text(json.dumps(out, indent=1))


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average: single-batch statistics are noisy, the trend is what matters."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def _curve(res: dict, split: str, key: str) -> tuple[list[int], list[float]]:
    curve = res[split]
    its = sorted(int(i) for i in curve)
    return its, [curve[str(i)][key] for i in its]


def plot(results: dict, path: Path, window: int) -> None:
    try:
        import matplotlib
    except ImportError:
        sys.exit("loss study: the plot needs matplotlib (pip install -e '.[examples]')")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("train", "entropy", f"entropy of pi (train, moving average of {window} steps)"),
              ("valid", "entropy", "entropy of pi (validation)"),
              ("train", "target_prob", f"pi(target) (train, moving average of {window})"),
              ("valid", "cross_entropy", "cross-entropy (validation)"),
              ("train", "tail_mass", f"tail mass outside the top-100 (train, moving average of {window})"),
              ("valid", "tail_mass", "tail mass outside the top-100 (validation)")]
    fig, axes = plt.subplots(3, 2, figsize=(12, 11))
    for ax, (split, key, title) in zip(axes.flat, panels):
        for name, res in results.items():
            its, vals = _curve(res, split, key)
            if split == "train":
                its, vals = its[window - 1:], _smooth(vals, window)[window - 1:]
            ax.plot(its, vals, label=name, marker="o" if split == "valid" else None, markersize=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0, 0].legend()
    fig.suptitle("`tiny` (4 layers, hidden 128, 4096-token BPE) on the demo corpus: generalized-loss settings, k = 100")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def table(results: dict, args) -> str:
    def tail_mean(res, key):   # mean over the last `--table-window` iterations (single batches are noisy)
        its, vals = _curve(res, "train", key)
        keep = [v for i, v in zip(its, vals) if i > args.train_iters - args.table_window]
        return sum(keep) / len(keep)

    lines = [f"# Loss study: `tiny` on the demo corpus, {args.train_iters} iterations, k = 100", "",
             f"Command: `python examples/loss_study/run_study.py --train-iters {args.train_iters} "
             f"--log-interval {args.log_interval} --eval-interval {args.eval_interval}` (one seed, identical "
             "data order). Train columns: mean over the last "
             f"{args.table_window} iterations (one global batch of 8 x 128 tokens each); validation: the "
             "final evaluation (8 batches of 8 x 128 tokens).", "",
             "| setting | train entropy | train CE | train pi(x) | train tail mass | valid entropy | valid CE | valid pi(x) | valid top-1 | valid tail mass | time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        va = r["valid"]
        fin = va[max(va, key=int)]
        lines.append(f"| {name} | {tail_mean(r, 'entropy'):.3f} | {tail_mean(r, 'cross_entropy'):.3f} | "
                     f"{tail_mean(r, 'target_prob'):.4f} | {tail_mean(r, 'tail_mass'):.4f} | "
                     f"{fin['entropy']:.3f} | {fin['cross_entropy']:.3f} | {fin['target_prob']:.4f} | "
                     f"{fin['top1']:.3f} | {fin['tail_mass']:.4f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output-dir", default="runs/loss_study")
    ap.add_argument("--data-dir", default="runs/demo", help="where cpu_demo's corpus/tokenizer/data live")
    ap.add_argument("--train-iters", type=int, default=600)
    ap.add_argument("--log-interval", type=int, default=20)
    ap.add_argument("--eval-interval", type=int, default=100)
    ap.add_argument("--smooth", type=int, default=25, help="moving-average window of the train curves")
    ap.add_argument("--table-window", type=int, default=100, help="train statistics averaged over these last iterations")
    ap.add_argument("--parallel", type=int, default=2, help="settings trained at the same time")
    ap.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--run-one", help=argparse.SUPPRESS)
    ap.add_argument("--argv", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_one:
        return run_one(args)

    from cpu_demo import prepare_data
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tok_model, document = prepare_data((ROOT / args.data_dir).resolve(), 4096)
    pending = list(args.settings)
    running: dict[str, subprocess.Popen] = {}
    threads = max(1, (os.cpu_count() or 1) // args.parallel)
    while pending or running:
        while pending and len(running) < args.parallel:
            name = pending.pop(0)
            js = out / f"{name}.json"
            if js.exists():
                continue
            argv = train_argv(args, tok_model, document, name)
            print(f"==> {name}: pretrain {' '.join(argv)}", flush=True)
            env = dict(os.environ, OMP_NUM_THREADS=str(threads))
            running[name] = subprocess.Popen(
                [sys.executable, __file__, "--run-one", name, "--argv", json.dumps(argv), "--json", str(js)],
                cwd=ROOT, env=env, stdout=open(out / f"{name}.log", "w"), stderr=subprocess.STDOUT)
        for name, proc in list(running.items()):
            if proc.poll() is not None:
                del running[name]
                if proc.returncode:
                    sys.exit(f"loss study: setting {name} failed; see {out / (name + '.log')}")
                print(f"    {name} done", flush=True)
        time.sleep(1)
    results = {name: json.loads((out / f"{name}.json").read_text()) for name in args.settings}
    plot(results, out / "study.png", args.smooth)
    md = table(results, args)
    (out / "study.md").write_text(md)
    print(md)
    print(f"==> {out / 'study.png'}, {out / 'study.md'}")


if __name__ == "__main__":
    main()
