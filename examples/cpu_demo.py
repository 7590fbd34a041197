"""The embedded default job (`make demo`): a real small pretraining run on CPU, end to end.

1. builds a public-domain English corpus offline (Jane Austen + Moby Dick from Debian packages),
2. trains a sentencepiece BPE tokenizer on it (tools/train_tokenizer.py),
3. preprocesses it to Megatron indexed format (tools/preprocess_data.py),
4. pretrains the `tiny` preset with tensor parallelism 2 (torchrun, two gloo processes), stopping
   part-way (--exit-interval) after writing a checkpoint, like a preempted job,
5. resumes the same command from that checkpoint to the end,
6. prints where the data, tokenizer, checkpoints and TensorBoard logs are.
Every step is skipped when its output already exists (delete --output-dir to start over).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str], what: str, log: Path | None = None) -> str:
    print(f"\n==> {what}\n    $ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    with open(log, "a") if log else open(os.devnull, "w") as sink:
        for line in proc.stdout:
            lines.append(line)
            sink.write(line)
            if log is None or "iteration" in line or line.startswith((">", "error", "Traceback", " validation")) \
                    or "Error" in line:
                print("    " + line.rstrip(), flush=True)
    if proc.wait() != 0:
        sys.exit(f"demo: step '{what}' failed (exit code {proc.returncode}); "
                 f"{'see ' + str(log) if log else 'output above'}")
    print(f"    ({time.perf_counter() - t0:.1f} s)", flush=True)
    return "".join(lines)


def prepare_data(out: Path, vocab_size: int) -> tuple[Path, Path]:
    """Steps 1-3 (each skipped when done): corpus, sentencepiece model, indexed dataset.
    Returns (tokenizer model, dataset prefix). Also used by examples/loss_study."""
    py = sys.executable
    from megatron_rpt.demo_assets.corpus import build_demo_corpus
    print("==> corpus (public-domain prose from Debian packages, offline)", flush=True)
    corpus = build_demo_corpus(out / "corpus")

    tok_prefix = out / "tokenizer" / "spm"
    tok_model = Path(str(tok_prefix) + ".model")
    if not tok_model.exists():
        tok_prefix.parent.mkdir(parents=True, exist_ok=True)
        run([py, "tools/train_tokenizer.py", "--input", str(corpus), "--model-type", "bpe",
             "--vocab-size", str(vocab_size), "--output-prefix", str(tok_prefix)], "train tokenizer")

    data_prefix = out / "data" / "demo"
    document = Path(str(data_prefix) + "_text_document")
    if not Path(str(document) + ".idx").exists():
        data_prefix.parent.mkdir(parents=True, exist_ok=True)
        run([py, "tools/preprocess_data.py", "--input", str(corpus), "--json-keys", "text",
             "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(tok_model),
             "--append-eod", "--workers", "2", "--output-prefix", str(data_prefix)], "preprocess to .bin/.idx")
    return tok_model, document


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output-dir", default="runs/demo")
    ap.add_argument("--train-iters", type=int, default=300)
    ap.add_argument("--interrupt-at", type=int, default=150, help="first run exits here (after saving)")
    ap.add_argument("--vocab-size", type=int, default=4096)
    args = ap.parse_args()
    out = (ROOT / args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    t_start = time.perf_counter()

    tok_model, document = prepare_data(out, args.vocab_size)
    corpus = out / "corpus"

    ckpt, tb = out / "checkpoints", out / "tensorboard"
    train = [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
             "-m", "megatron_rpt.pretrain",
             "--model-preset", "tiny", "--tensor-model-parallel-size", "2",
             "--micro-batch-size", "8", "--global-batch-size", "8",
             "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "20",
             "--train-iters", str(args.train_iters), "--weight-decay", "0.1", "--clip-grad", "1.0",
             "--adam-beta2", "0.95",
             "--data-path", str(document), "--split", "98,2,0",
             "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(tok_model),
             "--save", str(ckpt), "--load", str(ckpt), "--save-interval", "100",
             "--eval-interval", "100", "--eval-iters", "4", "--log-interval", "10",
             "--tensorboard-dir", str(tb), "--seed", "1234"]
    log = out / "train.log"
    first = run(train + ["--exit-interval", str(args.interrupt_at)],
                f"pretrain tiny, TP=2, iterations 1..{args.interrupt_at} then stop (as if preempted)", log)
    second = run(train, f"resume from the checkpoint to iteration {args.train_iters}", log)

    losses = [float(x) for x in re.findall(r"lm loss: ([0-9.E+-]+)", first + second)]
    if len(losses) < 2 or not losses[-1] < losses[0]:
        sys.exit(f"demo: the loss did not fall ({losses[:1]} -> {losses[-1:]})")
    if "resumed from" not in second:
        sys.exit("demo: the second run did not resume from the checkpoint")
    print(f"\n==> done in {time.perf_counter() - t_start:.0f} s: lm loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    print(f"    corpus:       {corpus}")
    print(f"    tokenizer:    {tok_model}")
    print(f"    dataset:      {document}.bin/.idx")
    print(f"    checkpoints:  {ckpt} (latest: {(ckpt / 'latest_checkpointed_iteration.txt').read_text().strip()})")
    print(f"    tensorboard:  {tb}   (tensorboard --logdir {tb})")
    print(f"    training log: {log}")


if __name__ == "__main__":
    main()
