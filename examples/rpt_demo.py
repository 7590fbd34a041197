"""`make demo-rpt`: Reinforcement Pre-Training where thinking helps, end to end on CPU in a few minutes.

1. a synthetic corpus (megatron_rpt.demo_assets.reasoning): chains of single-digit operations mod 10,
   half written with worked steps (`Q:7+5*3-8=<think>7+5=2,2*3=6,6-8=8</think>\\boxed{8}`), half
   short (`7+5*3-8=8`), and a fixed tokenizer (characters, one token per operation+operand pair
   such as `*3`, `<think>`/`</think>`/`\\boxed{` one token each; the answer digit is its own token);
2. the corpus to Megatron's indexed format (tools/preprocess_data.py);
3. pretraining a 0.4M-parameter model from scratch on it (mrpt-pretrain, torchrun, 1 rank: on 2
   cores tensor parallelism only adds communication to a model this small);
4. RPT tasks: the answer positions of short-form documents (the next corpus token is the answer;
   written as task records by demo_assets.reasoning, read by rpt.tasks.load_tasks; no entropy
   filter, since the positions are chosen by construction), training tasks from the corpus,
   held-out tasks from problems it never contains;
5. RPT (mrpt-rpt): the prompt `Q:{context}` (after the end-of-document token that precedes every
   document in pretraining) turns a short-form context into a worked question,
   G=8 responses per context at temperature 1, prefix-match reward on the `\\boxed{}` digit, GRPO;
   held-out next-token accuracy before and after: standard mode (the greedy next token of the raw
   context) and reasoning mode (avg@k / pass@k of sampled worked responses);
6. prints the reward per step and the before/after table, and draws both into OUTPUT/rpt_demo.png.
Every step is skipped when its output exists (delete --output-dir to start over); seeds are fixed and
whatever the run gives is what is printed.

What the committed defaults print (2026-12-07; three runs, identical output: everything is seeded):
- before RPT the pretrained model answers held-out questions directly (standard mode) 28.9% of the time
  (chance is 10%) and, thinking at temperature 1 (reasoning mode), 92.5% (avg@8; cons@8 98.4%, pass@8 100%);
- 30 RPT steps (16 contexts x G=8, lr 1e-4): mean reward 0.936 over the first 5 steps, 0.955 over the
  last 5 (per step 0.89-0.98); held-out reasoning avg@8 0.925 -> 0.946, cons@8 0.984 -> 1.000; standard
  mode 0.289 -> 0.258 (4 of 128 tasks; RPT updates the reasoning responses, not the direct answer);
- times: on idle 2 cores (an end-to-end run of `make demo-rpt` with .venv present, 2026-12-07) 3 min
  2 s: corpus + tokenizer + tasks 4.2 s, preprocessing 3.8 s, pretraining 126.6 s, RPT 45.9 s (the two
  evaluations 5.1 and 4.0 s; rollouts 3,800-5,900 tok/s), with the same printed numbers as above. On 2
  cores shared with other jobs (load average 10-16) two runs took 13.1 and 11.8 minutes (pretraining
  509-738 s, one evaluation up to 115 s).
- an earlier setting, RPT lr 5e-4 with 8 contexts a step, made the policy fall apart (reward 0.77 -> 0.27
  in 20 steps): fresh Adam moments make every update ~lr x sign(g), and 64 rollouts a step give noisy
  signs; lr 1e-4 with 16 contexts is the default for that reason.
The real-model path (SmolLM2-135M on math text, where a few CPU steps give reward ~0) is
`make demo-rpt-smollm2` (examples/rpt_smollm2_demo.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
from cpu_demo import run  # noqa: E402  (the pretraining demo's step runner)

# The model: the `tiny` preset cut to 2 layers (0.4M parameters; the vocabulary has 54 tokens).
MODEL = ["--model-preset", "tiny", "--num-layers", "2", "--seq-length", "128", "--max-position-embeddings", "128"]


def _timed(times: dict, name: str, t0: float) -> None:
    times[name] = time.perf_counter() - t0


def parse_steps(log_text: str) -> dict:
    """iteration -> {reward, pass@G, ...} from the trainer's per-step lines (the last run's wins)."""
    steps = {}
    for m in re.finditer(r" iteration\s+(\d+)/\s*\d+ \| consumed contexts:.*", log_text):
        line = m.group(0)
        fields = dict(re.findall(r"\| ([a-zA-Z@0-9 |\-]+?): ([-0-9.e+]+)", line))
        rate = re.search(r"rollout: ([0-9.]+) s \(([0-9.]+) tok/s\)", line)
        steps[int(m.group(1))] = {"reward": float(fields["reward"]), "rollout_s": float(rate.group(1)),
                                  "rollout_tok_s": float(rate.group(2)),
                                  "response_length": float(fields["response length"])}
    return steps


def _running_mean(values: list, width: int = 5) -> list:
    return [sum(values[max(0, i + 1 - width):i + 1]) / len(values[max(0, i + 1 - width):i + 1])
            for i in range(len(values))]


def plot(path: Path, steps: dict, before: dict, after: dict, k: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    its = sorted(steps)
    rewards = [steps[i]["reward"] for i in its]
    a.plot(its, rewards, marker="o", ms=3, alpha=0.5, label="per step")
    a.plot(its, _running_mean(rewards), label="mean of the last 5 steps")
    a.legend(loc="lower right")
    a.set(xlabel="RPT step", ylabel="mean reward (G rollouts x contexts)", title="training reward", ylim=(0, 1))
    a.grid(alpha=0.3)
    labels = ["standard\n(greedy next token)", f"reasoning\navg@{k}", f"reasoning\npass@{k}"]
    keys = ["all/standard_acc", f"all/avg@{k}", f"all/pass@{k}"]
    x = range(len(keys))
    a_before = [before[key] for key in keys]
    a_after = [after[key] for key in keys]
    b.bar([i - 0.2 for i in x], a_before, width=0.4, label=f"before RPT (step {before['iteration']})")
    b.bar([i + 0.2 for i in x], a_after, width=0.4, label=f"after RPT (step {after['iteration']})")
    b.set_xticks(list(x), labels)
    b.set(ylabel="held-out next-token accuracy", ylim=(0, 1), title="held-out answer token")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output-dir", default="runs/demo-rpt")
    ap.add_argument("--documents", type=int, default=20000, help="pretraining documents (problems)")
    ap.add_argument("--heldout", type=int, default=128, help="held-out problems (evaluation tasks)")
    ap.add_argument("--pretrain-iters", type=int, default=600)
    ap.add_argument("--steps", type=int, default=30, help="RPT steps")
    ap.add_argument("--contexts", type=int, default=16, help="contexts per RPT step")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--eval-samples", type=int, default=8, help="k of reasoning-mode avg@k / pass@k")
    ap.add_argument("--rpt-lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=1234)
    a = ap.parse_args(argv)
    os.environ["PYTHONUNBUFFERED"] = "1"   # the trainer's lines reach the log as they are printed
    out = (ROOT / a.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    t_all = time.perf_counter()
    times: dict = {}
    launch = [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]

    from megatron_rpt.data.tokenizers.huggingface_tokenizer import HuggingFaceTokenizer
    from megatron_rpt.demo_assets import reasoning as R
    from megatron_rpt.fileio import write_jsonl

    # 1. corpus, tokenizer, tasks (pure Python, seconds)
    t0 = time.perf_counter()
    tok_dir = R.write_tokenizer(out / "tokenizer")
    corpus_file, tasks = out / "corpus.jsonl", out / "tasks" / "chains"
    train_tasks, heldout_tasks = Path(f"{tasks}_train.jsonl"), Path(f"{tasks}_heldout.jsonl")
    if not (corpus_file.exists() and heldout_tasks.exists()):
        print("==> corpus: chains of digit operations mod 10, worked and short form", flush=True)
        corpus = R.build_corpus(a.documents, a.heldout, seed=a.seed)
        tokenizer = HuggingFaceTokenizer(str(tok_dir))
        tasks.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(train_tasks, R.task_records(corpus.short, tokenizer, prefix="train"))
        write_jsonl(heldout_tasks, R.task_records(corpus.heldout, tokenizer, prefix="heldout"))
        write_jsonl(corpus_file, ({"text": d} for d in corpus.documents))
        worked = next(d for d in corpus.documents if d.startswith(R.WORKED_PREFIX))
        short = next(d for d in corpus.documents if not d.startswith(R.WORKED_PREFIX))
        print(f"    {len(corpus.documents)} documents, e.g.\n      {worked}\n      {short}", flush=True)
    template = out / "prompt_template.txt"
    template.write_text(R.PROMPT_TEMPLATE + "\n", encoding="utf-8")
    _timed(times, "corpus + tokenizer + tasks", t0)

    # 2. indexed dataset
    t0 = time.perf_counter()
    data = out / "data" / "chains"
    document = Path(f"{data}_text_document")
    if not Path(f"{document}.idx").exists():
        data.parent.mkdir(parents=True, exist_ok=True)
        run([py, "tools/preprocess_data.py", "--input", str(corpus_file), "--tokenizer-type", "HuggingFaceTokenizer",
             "--tokenizer-model", str(tok_dir), "--append-eod", "--output-prefix", str(data), "--no-progress"],
            "preprocess to .bin/.idx")
    _timed(times, "preprocess", t0)

    # 3. pretraining from scratch
    t0 = time.perf_counter()
    ckpt = out / "pretrained"
    tokenizer_flags = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tok_dir)]
    if not (ckpt / "latest_checkpointed_iteration.txt").exists():
        run(launch + ["-m", "megatron_rpt.pretrain", *MODEL, *tokenizer_flags,
                      "--micro-batch-size", "32", "--global-batch-size", "32",
                      "--lr", "4e-3", "--min-lr", "4e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", str(min(30, a.pretrain_iters // 5)),
                      "--train-iters", str(a.pretrain_iters), "--weight-decay", "0.1", "--clip-grad", "1.0",
                      "--adam-beta2", "0.95", "--data-path", str(document), "--split", "100,0,0",
                      "--save", str(ckpt), "--save-interval", str(a.pretrain_iters), "--eval-iters", "0",
                      "--log-interval", "50", "--tensorboard-dir", str(out / "tensorboard" / "pretrain"),
                      "--seed", str(a.seed)],
            f"pretrain a 2-layer model from scratch ({a.pretrain_iters} iterations)", log=out / "pretrain.log")
    _timed(times, "pretrain", t0)

    # 4. RPT with evaluation before and after
    t0 = time.perf_counter()
    save, log = out / "rpt", out / "rpt.log"
    evals_file = save / "rpt_eval.jsonl"
    if not (evals_file.exists() and any(json.loads(x)["iteration"] == a.steps
                                        for x in evals_file.read_text().splitlines())):
        for stale in (log, evals_file):   # a fresh run's lines only (the curve and the table are read from them)
            if stale.exists():
                stale.unlink()
        run(launch + ["-m", "megatron_rpt.train_rpt", *MODEL, *tokenizer_flags,
                      "--load", str(ckpt), "--finetune", "--save", str(save), "--save-interval", str(a.steps),
                      "--rpt-data", str(train_tasks), "--rpt-eval-data", str(heldout_tasks),
                      "--rpt-eval-samples", str(a.eval_samples), "--rpt-prompt-template", str(template),
                      "--rpt-contexts-per-step", str(a.contexts), "--rpt-group-size", str(a.group_size),
                      "--rpt-max-response-length", "40", "--rpt-temperature", "1.0",
                      "--micro-batch-size", str(a.contexts * a.group_size), "--train-iters", str(a.steps),
                      "--lr", str(a.rpt_lr), "--lr-decay-style", "constant", "--weight-decay", "0.0",
                      "--clip-grad", "1.0", "--eval-interval", "100000", "--log-interval", "1",
                      "--tensorboard-dir", str(out / "tensorboard" / "rpt"), "--no-log-memory",
                      "--seed", str(a.seed)],
            f"RPT: {a.steps} steps of {a.contexts} contexts x G={a.group_size} (evaluation before and after)",
            log=log)
    _timed(times, "RPT (incl. 2 evaluations)", t0)

    evals = [json.loads(x) for x in evals_file.read_text().splitlines()]
    before = next(e for e in evals if e["iteration"] == 0)
    after = next(e for e in evals if e["iteration"] == a.steps)
    text = log.read_text(encoding="utf-8")
    steps = parse_steps(text)
    eval_s = [float(s) for s in re.findall(r"> evaluation at iteration \d+ \(([0-9.]+) s\)", text)]
    k = a.eval_samples

    print("\n==> reward per RPT step (mean over contexts x G rollouts)")
    for i in sorted(steps):
        s = steps[i]
        print(f"    step {i:3d}  reward {s['reward']:.3f}  {'#' * round(40 * s['reward'])}")
    its = sorted(steps)
    first, last = [steps[i]["reward"] for i in its[:5]], [steps[i]["reward"] for i in its[-5:]]
    print(f"    mean reward, first 5 steps: {sum(first) / len(first):.3f}; last 5 steps: {sum(last) / len(last):.3f}")
    rates = [s["rollout_tok_s"] for s in steps.values()]
    print(f"\n==> held-out next-token accuracy ({before['all/tasks']} answer tokens never seen in pretraining)")
    print(f"    {'mode':34s} {'before':>8s} {'after':>8s}")
    for key, name in (("all/standard_acc", "standard (greedy next token)"),
                      (f"all/avg@{k}", f"reasoning avg@{k} (sampled, T=1)"),
                      ("all/pass@1", "reasoning pass@1"),
                      (f"all/pass@{k}", f"reasoning pass@{k}"),
                      (f"all/cons@{k}", f"reasoning cons@{k} (majority)")):
        print(f"    {name:34s} {before[key]:8.3f} {after[key]:8.3f}")
    png = out / "rpt_demo.png"
    plot(png, steps, before, after, k)
    times["total"] = time.perf_counter() - t_all
    print("\n==> times (s; a skipped step counts ~0)")
    for name, s in times.items():
        print(f"    {name:30s} {s:7.1f}")
    if eval_s:
        print(f"    (evaluations inside RPT: {', '.join(f'{s:.1f}' for s in eval_s)} s; rollouts "
              f"{min(rates):.0f}-{max(rates):.0f} tok/s)")
    print(f"\n  plot:         {png}\n  evaluations:  {evals_file}\n  RPT log:      {log}\n"
          f"  TensorBoard:  tensorboard --logdir {out / 'tensorboard'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
