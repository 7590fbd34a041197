"""Small-scale pipeline study (issue 22): pretraining loss -> RL, and RPT / RLP before RLVR, on CPU.

Everything runs on the synthetic digit-chain corpus of `megatron_rpt.demo_assets.reasoning` (chains
of single-digit operations mod 10, worked form `Q:7+5*3-8=<think>7+5=2,...</think>\\boxed{8}` and
short form `7+5*3-8=8`) with a 2-layer `tiny` model (0.4M parameters, 54-token vocabulary):

1. data: corpus, tokenizer, indexed dataset; RPT tasks at the answer positions of the corpus's
   short-form documents; two disjoint sets of RLVR problem files (rpt.tasks.problems format) from
   problems the corpus never contains: RL-train and evaluation. The RLVR prompt template
   `<|endoftext|>Q:{context}=` is the start of a worked document, so the model answers
   `<think>...</think>\\boxed{d}`; the RPT template `<|endoftext|>Q:{context}` gives the same tokens
   for a corpus context (`7+5*3-8=`).
2. pretraining ("Diversity or Precision?"): CE, beta = -0.25, lambda_low = -0.1 (generalized loss,
   top-k K = 5 of the 54-token vocabulary), same data, seed and budget.
3. RLVR (GRPO, --rl-reward math_answer) from each pretrained model, one run per training seed;
   held-out pass@1,2,4,8,16, avg@16, cons@16 before and after (rpt/evaluate.py, 16 samples), and the
   per-step entropy, response length (and std), answer rate and reward of the loop.
4. pipelines at the same GRPO budget, from the CE model, per seed: RLVR for N+M steps (stage 3's CE
   run) vs RPT (--rl-reward prefix_match on the corpus tasks) for N steps then RLVR for M, vs RLP
   (--rl-reward information_gain on the same corpus tasks and seed, so the same contexts) for N then
   RLVR for M. The RLP stages run only where the RLP loop exists in this tree (`megatron_rpt.rpt.rlp`);
   otherwise they are left out and the report says so.

Every stage runs in-process (mrpt-pretrain / mrpt-rpt's own functions, one after the other; each
tears its process group down), or with `--parallel N` in up to N child processes started when the
stages they need are done, and writes RESULTS/stages/<stage>.json when complete; a stage whose JSON
exists is skipped (delete it to rerun). Besides the loop's metrics, the JSON holds each evaluation's
responses, lengths and rewards and each step's response lengths, recorded by a wrapper of the
rollout engine (the loop writes aggregates only), so the metrics can be recomputed from the
responses (tests/e2e/test_pipeline_study.py does). Results: RESULTS/stages/*.json,
RESULTS/summary.json, RESULTS/study.md, RESULTS/study.png; checkpoints, data and logs under OUTPUT.

    python examples/pipeline_study/run_study.py --parallel 2          # the study (README.md: its time)
    python examples/pipeline_study/run_study.py --config long --parallel 2
    python examples/pipeline_study/run_study.py --small              # the test's configuration
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
K_TOP = 5     # --loss-topk: the head of a 54-token vocabulary (the paper's k = 100 of 151k is its head)
LOSSES = {    # name: pretraining loss flags (generalized loss; CE is beta = lambda = 0)
    "ce": [],
    "beta=-0.25": ["--loss-beta", "-0.25"],
    "lambda_low=-0.1": ["--loss-lambda-low", "-0.1"],
}
# The model: the `tiny` preset cut to 2 layers, as `make demo-rpt` (examples/rpt_demo.py), with 64-token
# sequences (a prompt is <= 12 tokens, a response <= 40; a pretraining sequence holds ~2.5 documents).
MODEL = ["--model-preset", "tiny", "--num-layers", "2", "--seq-length", "64", "--max-position-embeddings", "64"]
PROBLEM_TEMPLATE = "<|endoftext|>Q:{context}="     # reasoning.PROMPT_TEMPLATE with the `=` the question lacks

CONFIGS = {
    "full": dict(documents=20000, rl_train=256, eval_problems=32, pretrain_iters=300, pretrain_batch=32,
                 rl_steps=12, stage1_steps=6, contexts=8, group=8, eval_samples=16, max_response=40,
                 rl_lr=5e-4, seeds=[1, 2, 3], losses=list(LOSSES)),
    # The second configuration (run after the first's RLVR raised the entropy and lowered the reward at
    # lr 5e-4): the demo's pretraining budget, a 5x smaller RL learning rate, twice the RL steps.
    "long": dict(documents=20000, rl_train=256, eval_problems=64, pretrain_iters=600, pretrain_batch=32,
                 rl_steps=24, stage1_steps=12, contexts=8, group=8, eval_samples=16, max_response=40,
                 rl_lr=1e-4, seeds=[1, 2, 3], losses=list(LOSSES)),
    # `long` again from pretraining seeds 2 and 3 (one RL seed, no RPT/RLP pipelines), CE and lambda_low
    # only (the time left): whether long's difference between them after RL outlives the pretraining run.
    **{f"long_p{p}": dict(documents=20000, rl_train=256, eval_problems=64, pretrain_iters=600, pretrain_batch=32,
                          rl_steps=24, stage1_steps=12, contexts=8, group=8, eval_samples=16, max_response=40,
                          rl_lr=1e-4, seeds=[1], losses=["ce", "lambda_low=-0.1"], pretrain_seed=p, pipelines=False)
       for p in (2, 3)},
    "small": dict(documents=2000, rl_train=8, eval_problems=4, pretrain_iters=2, pretrain_batch=4,
                  rl_steps=2, stage1_steps=1, contexts=2, group=2, eval_samples=4, max_response=16,
                  rl_lr=5e-4, seeds=[1], losses=["ce"]),
}
DATA_SEED = 1234
PRETRAIN_SEED = 1234
STEP_KEYS = ("reward", "entropy", "response_length", "response_length_std", "answer_rate", "kl",
             "clip_fraction", "informative_group_fraction", "time_rollout_s", "time_train_s",
             # RLP's (reward = information gain)
             "s_pred", "s_ema", "thought_length", "closed_fraction", "positive_gain_fraction")


# ---------------------------------------------------------------- recording the rollouts

class _Recorder:
    """Wraps the loop's rollout engine: every generate call's per-response token counts and texts,
    tagged "eval" while `rpt.loop.evaluate_tasks` runs and "train" otherwise."""

    def __init__(self):
        self.calls: list = []
        self.phase = "train"

    def wrap(self, engine):
        recorder = self

        class Engine:
            def __getattr__(self, name):
                return getattr(engine, name)

            def generate(self, prompts, n, sampling):
                out = engine.generate(prompts, n, sampling)
                recorder.calls.append({"phase": recorder.phase, "max_new_tokens": sampling.max_new_tokens,
                                       "groups": [[(len(o.tokens), o.text) for o in g] for g in out]})
                return out
        return Engine()


@contextlib.contextmanager
def recording():
    """Installs the recorder around rpt.loop's engine and evaluation for one RL stage."""
    from megatron_rpt.rpt import loop
    rec = _Recorder()
    build, evaluate = loop.build_engine, loop.evaluate_tasks

    def evaluate_tasks(*a, **kw):
        rec.phase = "eval"
        try:
            return evaluate(*a, **kw)
        finally:
            rec.phase = "train"
    loop.build_engine = lambda cfg, job: rec.wrap(build(cfg, job))
    loop.evaluate_tasks = evaluate_tasks
    try:
        yield rec
    finally:
        loop.build_engine, loop.evaluate_tasks = build, evaluate


def _rollout_records(rec: _Recorder, result, reward_name: str, eval_tasks: list, steps: int, eval_samples: int):
    """(eval responses per evaluated iteration, train responses per step) from the recorded calls: the
    reasoning-mode call of each evaluation (the standard-mode one, one greedy token, is skipped) and
    one call per step, in order. Rewards are re-scored with the run's reward."""
    from megatron_rpt.rpt.rewards import get_reward
    spec = get_reward(reward_name)
    evals = [c for c in rec.calls if c["phase"] == "eval" and c["max_new_tokens"] > 1]
    trains = [c for c in rec.calls if c["phase"] == "train"]
    eval_iters = sorted(result.evaluations)
    if len(evals) != len(eval_iters) or len(trains) != steps:
        raise RuntimeError(f"recorded {len(evals)} evaluations / {len(trains)} steps, the run has "
                           f"{len(eval_iters)} / {steps}")
    eval_out = {}
    for it, call in zip(eval_iters, evals):
        rows = []
        for task, group in zip(eval_tasks, call["groups"]):
            if len(group) != eval_samples:
                raise RuntimeError(f"evaluation at {it}: {len(group)} responses, expected {eval_samples}")
            texts = [t for _, t in group]
            rows.append({"id": task.id, "answer": getattr(task, "answer", None), "texts": texts,
                         "lengths": [n for n, _ in group],
                         "rewards": [spec.score(t, task) for t in texts] if spec.score else None})
        eval_out[str(it)] = rows
    train_out = {str(i + 1): {"lengths": [[n for n, _ in g] for g in c["groups"]]} for i, c in enumerate(trains)}
    return eval_out, train_out


# ---------------------------------------------------------------- stages

def _run_logged(fn, log: Path):
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            return fn()
        finally:
            from megatron_rpt.distributed import destroy_distributed
            destroy_distributed()


def _write_json(path: Path, obj, indent=None) -> None:
    """Compact by default: the stages' JSON holds every evaluation response (committed results)."""
    from megatron_rpt.fileio import atomic_open
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(str(path)) as f:
        f.write(json.dumps(obj, indent=indent))


class Study:
    def __init__(self, args, cfg: dict):
        self.a, self.c = args, cfg
        self.out = Path(args.output_dir).resolve()
        self.results = Path(args.results_dir).resolve()
        self.stages = self.results / "stages"
        self.rlp = importlib.util.find_spec("megatron_rpt.rpt.rlp") is not None

    # -- data
    def data(self) -> None:
        from megatron_rpt.data.tokenizers.huggingface_tokenizer import HuggingFaceTokenizer
        from megatron_rpt.demo_assets import reasoning as R
        from megatron_rpt.fileio import write_jsonl
        from megatron_rpt.rpt.tasks.problem_sources import write_problem_files
        from megatron_rpt.rpt.tasks.problems import Problem
        c, out = self.c, self.out
        self.tok = R.write_tokenizer(out / "tokenizer")
        self.document = out / "data" / "chains_text_document"
        self.rpt_tasks = out / "tasks" / "corpus_train.jsonl"
        self.problems = {s: out / "problems" / f"chains_{s}.jsonl" for s in ("train", "heldout")}
        self.templates = {"problem": out / "problem_template.txt", "corpus": out / "rpt_template.txt"}
        if not (Path(f"{self.document}.idx").exists() and self.problems["heldout"].exists()):
            corpus = R.build_corpus(c["documents"], c["rl_train"] + c["eval_problems"], seed=DATA_SEED)
            in_corpus = {p.question for p in corpus.short} | {d[len(R.WORKED_PREFIX):].split("=")[0]
                                                              for d in corpus.documents if d.startswith("Q:")}
            sets = {"train": corpus.heldout[:c["rl_train"]], "heldout": corpus.heldout[c["rl_train"]:]}
            if any(p.question in in_corpus for probs in sets.values() for p in probs):
                raise RuntimeError("a held-out problem is in the pretraining corpus")
            train, heldout = ([Problem(id=f"{name}{i}", family="digit_chain", source="demo_assets/reasoning",
                                       question=p.question, answer=str(p.answer), solution=p.worked_document(),
                                       splits=[]) for i, p in enumerate(probs)] for name, probs in sets.items())
            write_problem_files(str(out / "problems" / "chains"), train, heldout,
                                {"documents": c["documents"], "seed": DATA_SEED})
            tokenizer = HuggingFaceTokenizer(str(self.tok))
            self.rpt_tasks.parent.mkdir(parents=True, exist_ok=True)
            write_jsonl(self.rpt_tasks, R.task_records(corpus.short, tokenizer, prefix="corpus"))
            corpus_file = out / "corpus.jsonl"
            write_jsonl(corpus_file, ({"text": d} for d in corpus.documents))
            from megatron_rpt.data.preprocess import preprocess
            (out / "data").mkdir(parents=True, exist_ok=True)
            with open(out / "preprocess.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                preprocess([str(corpus_file)], str(out / "data" / "chains"), tokenizer_type="HuggingFaceTokenizer",
                           append_eod=True, progress=False, tokenizer_model=str(self.tok))
        self.templates["problem"].write_text(PROBLEM_TEMPLATE + "\n", encoding="utf-8")
        self.templates["corpus"].write_text(R.PROMPT_TEMPLATE + "\n", encoding="utf-8")

    def _tokenizer_flags(self) -> list:
        return ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(self.tok)]

    # -- pretraining
    def pretrain(self, loss: str) -> dict:
        name = f"pretrain_{loss}"
        js = self.stages / f"{name}.json"
        if js.exists():
            return json.loads(js.read_text())
        c, ckpt = self.c, self.out / "ckpt" / name
        shutil.rmtree(ckpt, ignore_errors=True)
        b = c["pretrain_batch"]
        argv = [*MODEL, *self._tokenizer_flags(), "--micro-batch-size", str(b), "--global-batch-size", str(b),
                "--lr", "4e-3", "--min-lr", "4e-4", "--lr-decay-style", "cosine",
                "--lr-warmup-iters", str(min(30, c["pretrain_iters"] // 10)),
                "--train-iters", str(c["pretrain_iters"]), "--weight-decay", "0.1", "--clip-grad", "1.0",
                "--adam-beta2", "0.95", "--data-path", str(self.document), "--split", "100,0,0",
                "--save", str(ckpt), "--save-interval", str(c["pretrain_iters"]), "--eval-iters", "0",
                "--log-interval", str(max(1, c["pretrain_iters"] // 20)), "--no-log-memory",
                "--seed", str(c.get("pretrain_seed", PRETRAIN_SEED)), "--loss-function", "generalized", "--loss-topk", str(K_TOP),
                *LOSSES[loss]]
        print(f"==> {name}: mrpt-pretrain {' '.join(argv)}", flush=True)
        from megatron_rpt.config import parse_args
        from megatron_rpt.training.loop import pretrain
        t0 = time.perf_counter()
        r = _run_logged(lambda: pretrain(parse_args(argv)), self.out / "logs" / f"{name}.log")
        res = {"stage": name, "argv": argv, "seconds": time.perf_counter() - t0, "checkpoint": str(ckpt),
               "losses": r.losses, "train": r.distribution}
        _write_json(js, res)
        print(f"    {res['seconds']:.0f} s, lm loss {r.losses[min(r.losses)]:.3f} -> {r.losses[max(r.losses)]:.3f}",
              flush=True)
        return res

    # -- RL
    def rl(self, name: str, reward: str, init_stage: str, steps: int, seed: int, evaluate: bool,
           extra: list = ()) -> dict:
        """One GRPO run from the checkpoint of stage `init_stage`."""
        js = self.stages / f"{name}.json"
        if js.exists():
            return json.loads(js.read_text())
        init = Path(json.loads((self.stages / f"{init_stage}.json").read_text())["checkpoint"])
        c, save = self.c, self.out / "ckpt" / name
        shutil.rmtree(save, ignore_errors=True)
        kind = "problem" if reward == "math_answer" else "corpus"
        data = self.problems["train"] if kind == "problem" else self.rpt_tasks
        argv = [*MODEL, *self._tokenizer_flags(), "--rl-reward", reward,
                "--load", str(init), "--finetune", "--save", str(save), "--save-interval", str(steps),
                "--rpt-data", str(data),
                # RLP prompts with the bare context + <think> (docs/rlp.md): no template
                *([] if reward == "information_gain" else ["--rpt-prompt-template", str(self.templates[kind])]),
                "--rpt-contexts-per-step", str(c["contexts"]), "--rpt-group-size", str(c["group"]),
                "--rpt-max-response-length", str(c["max_response"]), "--rpt-temperature", "1.0",
                "--micro-batch-size", str(c["contexts"] * c["group"]), "--train-iters", str(steps),
                "--lr", str(c["rl_lr"]), "--lr-decay-style", "constant", "--weight-decay", "0.0",
                "--clip-grad", "1.0", "--eval-interval", "100000", "--log-interval", "1", "--no-log-memory",
                "--seed", str(seed), *extra]
        if evaluate:
            argv += ["--rpt-eval-data", str(self.problems["heldout"]), "--rpt-eval-samples", str(c["eval_samples"])]
        print(f"==> {name}: mrpt-rpt {' '.join(argv)}", flush=True)
        from megatron_rpt.config import parse_rpt_args
        from megatron_rpt.rpt.loop import rpt_train
        from megatron_rpt.rpt.tasks import load_problems
        t0 = time.perf_counter()
        with recording() as rec:
            r = _run_logged(lambda: rpt_train(parse_rpt_args(argv)), self.out / "logs" / f"{name}.log")
        if r.iteration != steps:
            raise RuntimeError(f"{name} stopped at iteration {r.iteration} ({r.exit_reason}); see its log")
        eval_tasks = load_problems(self.problems["heldout"]) if evaluate else []
        eval_rows, train_rows = _rollout_records(rec, r, reward, eval_tasks, steps, c["eval_samples"])
        res = {"stage": name, "reward": reward, "init": str(init), "init_stage": init_stage, "seed": seed, "steps": steps, "argv": argv,
               "seconds": time.perf_counter() - t0, "checkpoint": str(save),
               "metrics": {str(i): {k: m.get(k) for k in STEP_KEYS} | {f"pass@{c['group']}": m.get(f"pass@{c['group']}")}
                           for i, m in r.metrics.items()},
               "evaluations": {str(i): m for i, m in r.evaluations.items()},
               "eval_responses": eval_rows, "train_responses": train_rows}
        _write_json(js, res)
        last = res["metrics"][str(steps)]
        print(f"    {res['seconds']:.0f} s, reward {res['metrics']['1']['reward']:.3f} -> {last['reward']:.3f}"
              + "".join(f", eval {i}: pass@1 {m['all/pass@1']:.3f}" for i, m in res["evaluations"].items()),
              flush=True)
        return res

    def plan(self) -> dict:
        """stage name -> (what runs it, the stages it needs), in the order a single process runs them:
        the pretraining runs, then seed by seed every RL stage (a cut-short study has whole seeds)."""
        c = self.c
        n, total = c["stage1_steps"], c["rl_steps"]
        stages = {f"pretrain_{loss}": (partial(self.pretrain, loss), []) for loss in c["losses"]}
        for seed in c["seeds"]:
            for loss in c["losses"]:
                stages[f"rlvr_{loss}_s{seed}"] = (partial(self.rl, f"rlvr_{loss}_s{seed}", "math_answer", f"pretrain_{loss}",
                                                          total, seed, True), [f"pretrain_{loss}"])
            for first, reward in (("rpt", "prefix_match"), ("rlp", "information_gain")):
                if (first == "rlp" and not self.rlp) or not c.get("pipelines", True):
                    continue
                s1, s2 = f"{first}_ce_s{seed}", f"{first}_rlvr_ce_s{seed}"
                stages[s1] = (partial(self.rl, s1, reward, "pretrain_ce", n, seed, False), ["pretrain_ce"])
                stages[s2] = (partial(self.rl, s2, "math_answer", s1, total - n, seed, True), [s1])
        return stages

    def done(self, name: str) -> bool:
        return (self.stages / f"{name}.json").exists()

    def run(self, parallel: int, argv: list) -> dict:
        """Every stage not done: in this process one after the other (parallel 1), or up to `parallel`
        child processes at a time (`--stage NAME`), each started when the stages it needs are done."""
        t0 = time.perf_counter()
        self.data()
        plan = self.plan()
        if parallel <= 1:
            for name, (fn, _) in plan.items():
                if not self.done(name):
                    fn()
        else:
            pending = [name for name in plan if not self.done(name)]
            running: dict = {}
            threads = max(1, (os.cpu_count() or 1) // parallel)
            while pending or running:
                for name in [x for x in pending if all(self.done(d) for d in plan[x][1])][:parallel - len(running)]:
                    pending.remove(name)
                    print(f"==> {name} (child process, log {self.out / 'logs' / (name + '.log')})", flush=True)
                    running[name] = subprocess.Popen([sys.executable, __file__, *argv, "--stage", name], cwd=ROOT,
                                                     env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
                if pending and not running:     # nothing started and nothing to wait for
                    sys.exit(f"pipeline study: stages {pending} wait for stages that are not done")
                time.sleep(1)
                for name, proc in list(running.items()):
                    if proc.poll() is not None:
                        del running[name]
                        if proc.returncode or not self.done(name):
                            for other in running.values():
                                other.terminate()
                            sys.exit(f"pipeline study: stage {name} failed; see {self.out / 'logs' / (name + '.log')}")
        self.seconds = time.perf_counter() - t0
        c = self.c
        load = lambda name: json.loads((self.stages / f"{name}.json").read_text())  # noqa: E731
        out = {"config": c, "rlp_available": self.rlp,
               "pretrain": {loss: load(f"pretrain_{loss}") for loss in c["losses"]},
               "rlvr": {loss: {seed: load(f"rlvr_{loss}_s{seed}") for seed in c["seeds"]} for loss in c["losses"]},
               "pipelines": {}}
        for first in (("rpt", "rlp") if self.rlp else ("rpt",)) if c.get("pipelines", True) else ():
            out["pipelines"][first] = {seed: {"stage1": load(f"{first}_ce_s{seed}"), "rlvr": load(f"{first}_rlvr_ce_s{seed}")}
                                       for seed in c["seeds"]}
        return out


# ---------------------------------------------------------------- report

def pass_curve(rows: list, k_max: int) -> list:
    """pass@k for k = 1..k_max, mean over problems, from the recorded rewards (unbiased estimator)."""
    from megatron_rpt.rpt.evaluate import pass_at_k
    out = []
    for k in range(1, k_max + 1):
        out.append(sum(pass_at_k(len(r["rewards"]), sum(x == 1.0 for x in r["rewards"]), k) for r in rows) / len(rows))
    return out


def _ms(values: list) -> str:
    """mean ± sample std (n >= 2) or the single value."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def summarize(out: dict) -> dict:
    """Per loss and per pipeline: the metrics before/after RL per seed (the numbers of the table)."""
    c = out["config"]
    k = c["eval_samples"]
    keys = [f"pass@{j}" for j in _pass_ks(k)] + [f"avg@{k}", f"cons@{k}"]

    def ev(stage: dict, when: str) -> dict:
        it = "0" if when == "before" else str(stage["steps"])
        m = stage["evaluations"][it]
        return {key: m[f"all/{key}"] for key in keys} | {"pass_curve": pass_curve(stage["eval_responses"][it], k)}

    summary = {"keys": keys, "rlvr": {}, "pipelines": {}}
    for loss, by_seed in out["rlvr"].items():
        summary["rlvr"][loss] = {w: {str(s): ev(st, w) for s, st in by_seed.items()} for w in ("before", "after")}
    summary["pipelines"]["rlvr"] = {w: summary["rlvr"]["ce"][w] for w in ("before", "after")}
    for first, by_seed in out["pipelines"].items():
        summary["pipelines"][first] = {w: {str(s): ev(p["rlvr"], w) for s, p in by_seed.items()}
                                       for w in ("before", "after")}
    return summary


def _pass_ks(k: int) -> list:
    from megatron_rpt.rpt.evaluate import pass_ks
    return pass_ks(k)


def _change(res: dict, key: str) -> list:
    """after - before of `key`, seed by seed."""
    return [res["after"][seed][key] - res["before"][seed][key] for seed in res["before"]]


def table(out: dict, summary: dict, stages: dict, wall_s: float, command: str) -> str:
    c = out["config"]
    keys = summary["keys"]
    n_seeds = len(c["seeds"])
    spread = "mean ± sample std over seeds" if n_seeds > 1 else "one seed"
    lines = [f"# Pipeline study: pretraining loss -> RLVR, and RPT / RLP before RLVR (`{command}`)", "",
             f"Model: 2-layer `tiny` (0.4M parameters); corpus: {c['documents']} digit-chain documents; "
             f"pretraining {c['pretrain_iters']} iterations x {c['pretrain_batch']} sequences of 64 tokens, "
             f"seed {c.get('pretrain_seed', PRETRAIN_SEED)}, top-k K = {K_TOP}. GRPO: {c['contexts']} problems x G = {c['group']} per step, "
             f"temperature 1, lr {c['rl_lr']}, training seeds {c['seeds']}. Evaluation: {c['eval_problems']} "
             f"held-out problems x {c['eval_samples']} samples (temperature 1); {spread}.", "",
             f"## RLVR ({c['rl_steps']} steps) after each pretraining loss", "",
             "| pretraining loss | when | " + " | ".join(keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    for loss, res in summary["rlvr"].items():
        for when in ("before", "after"):
            per_seed = res[when].values()
            lines.append(f"| {loss} | {when} RL | "
                         + " | ".join(_ms([s[key] for s in per_seed]) for key in keys) + " |")
        lines.append(f"| {loss} | change | " + " | ".join(_ms(_change(res, key)) for key in keys) + " |")
    k = c["eval_samples"]
    lines += ["", f"pass@k for every k = 1..{k} (unbiased estimator over the recorded rewards, mean over seeds):", "",
              "| pretraining loss | when | " + " | ".join(str(j) for j in range(1, k + 1)) + " |",
              "|---|---|" + "---|" * k]
    for loss, res in summary["rlvr"].items():
        for when in ("before", "after"):
            curves = [s["pass_curve"] for s in res[when].values()]
            lines.append(f"| {loss} | {when} RL | " + " | ".join(f"{statistics.mean(v):.3f}" for v in zip(*curves)) + " |")
    lines += ["", "Pretraining (one run per loss; the loss's own statistics of the logged steps of the last 20% "
              "of iterations, one batch each, averaged: plain CE is comparable across losses):", "",
              "| pretraining loss | train CE | entropy | pi(target) | top-1 | top-5 mass | seconds |",
              "|---|---|---|---|---|---|---|"]
    for loss, pre in out["pretrain"].items():
        tail = [v for it, v in pre["train"].items() if int(it) > 0.8 * c["pretrain_iters"]]
        mean = {key: statistics.mean(v[key] for v in tail) for key in tail[0]}
        lines.append(f"| {loss} | {mean['cross_entropy']:.3f} | {mean['entropy']:.3f} | {mean['target_prob']:.3f} | "
                     f"{mean['top1']:.3f} | {mean['topk_mass']:.3f} | {pre['seconds']:.0f} |")
    lines += ["", "Per-step RL metrics (mean over seeds, first -> last step):", "",
              "| pretraining loss | reward | entropy | response length | response length std | answer rate |",
              "|---|---|---|---|---|---|"]
    for loss, by_seed in out["rlvr"].items():
        def fl(key):
            first = statistics.mean(st["metrics"]["1"][key] for st in by_seed.values())
            last = statistics.mean(st["metrics"][str(st["steps"])][key] for st in by_seed.values())
            return f"{first:.3f} -> {last:.3f}"
        lines.append(f"| {loss} | " + " | ".join(fl(k) for k in ("reward", "entropy", "response_length",
                                                                   "response_length_std", "answer_rate")) + " |")
    n, m = c["stage1_steps"], c["rl_steps"] - c["stage1_steps"]
    lines += ["", f"## Same GRPO budget from the CE model: {n + m} RLVR steps vs {n} RPT / RLP steps + {m} RLVR steps",
              "", "'before' is the start of the (last) RLVR stage: the pretrained model, or the model after RPT / RLP.",
              "", "| pipeline | when | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    names = {"rlvr": f"RLVR {n + m}", "rpt": f"RPT {n} -> RLVR {m}", "rlp": f"RLP {n} -> RLVR {m}"}
    for first, res in summary["pipelines"].items():
        for when in ("before", "after"):
            lines.append(f"| {names[first]} | {when} RLVR | "
                         + " | ".join(_ms([s[key] for s in res[when].values()]) for key in keys) + " |")
        lines.append(f"| {names[first]} | change | " + " | ".join(_ms(_change(res, key)) for key in keys) + " |")
    lines += ["", "'change': after minus before, per seed (paired), then mean ± std over seeds. The seeds of one "
              "pretrained model share its weights before RL: the spread of 'before' is the evaluation's sampling noise."]
    if "rlp" not in summary["pipelines"]:
        lines += ["", "RLP -> RLVR: not run (`--rl-reward information_gain` has no loop in this tree)."]
    stage_s = {name: st["seconds"] for name, st in stages.items()}
    lines += ["", f"Time: {sum(stage_s.values()) / 60:.1f} min of stage runs in all (each stage's own wall-clock "
              f"time, as recorded in its JSON); {wall_s / 60:.1f} min of wall-clock time over the invocations that ran "
              "stages (with --parallel 2 two stages ran at a time; the data step, ~10 s, is not counted).", "",
              "| stage | seconds |", "|---|---|"] + [f"| {k} | {v:.0f} |" for k, v in stage_s.items()]
    return "\n".join(lines) + "\n"


def plot(out: dict, summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = out["config"]
    k = c["eval_samples"]
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    ks = list(range(1, k + 1))

    def band(ax, xs, per_seed, label, **kw):
        mean = [statistics.mean(v) for v in zip(*per_seed)]
        line, = ax.plot(xs, mean, label=label, **kw)
        if len(per_seed) > 1:
            ax.fill_between(xs, [min(v) for v in zip(*per_seed)], [max(v) for v in zip(*per_seed)],
                            color=line.get_color(), alpha=0.15)

    ax = axes[0, 0]
    for i, (loss, res) in enumerate(summary["rlvr"].items()):
        for when, style in (("before", "--"), ("after", "-")):
            band(ax, ks, [s["pass_curve"] for s in res[when].values()], f"{loss} {when} RL", linestyle=style,
                 color=f"C{i}")
    ticks = [j for j in (1, 2, 4, 8, 16) if j <= k]
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(j) for j in ticks])
    ax.set(xlabel="k", ylabel="pass@k (held-out)", title="pass@k before / after RLVR (band: seeds' range)")
    ax.legend(fontsize=7)
    for ax, key, title in ((axes[0, 1], "reward", "RLVR training reward"), (axes[0, 2], "entropy", "policy entropy"),
                           (axes[1, 0], "response_length", "response length (tokens)"),
                           (axes[1, 1], "answer_rate", "answer rate")):
        for loss, by_seed in out["rlvr"].items():
            steps = list(range(1, c["rl_steps"] + 1))
            band(ax, steps, [[st["metrics"][str(i)][key] for i in steps] for st in by_seed.values()], loss)
        ax.set(xlabel="RLVR step", title=title)
        ax.legend(fontsize=7)
    ax = axes[1, 2]
    keys = ["pass@1", f"pass@{k}", f"avg@{k}", f"cons@{k}"]
    firsts = list(summary["pipelines"])
    width = 0.8 / len(firsts)
    for i, first in enumerate(firsts):
        vals = [[s[key] for s in summary["pipelines"][first]["after"].values()] for key in keys]
        xs = [j + i * width for j in range(len(keys))]
        ax.bar(xs, [statistics.mean(v) for v in vals], width,
               yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in vals], label=first + (" -> rlvr" if first != "rlvr" else ""))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], keys)
    ax.set(title="same GRPO budget from CE: after the last RLVR step", ylim=(0, 1))
    ax.legend(fontsize=7)
    for a in axes.flat:
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output-dir", help="checkpoints, data, logs (default runs/pipeline_study[_CONFIG])")
    ap.add_argument("--results-dir", help="stages/*.json, study.md, study.png (default: results/ next to this "
                                          "script for --config full, results/CONFIG otherwise)")
    ap.add_argument("--config", choices=list(CONFIGS), default="full",
                    help="full: the study; long: longer pretraining, lower RL lr, more steps; small: the test's")
    ap.add_argument("--small", action="store_true", help="the same as --config small")
    ap.add_argument("--parallel", type=int, default=1, help="stages run at a time (child processes when > 1)")
    ap.add_argument("--stage", help=argparse.SUPPRESS)      # child process: run this one stage
    a = ap.parse_args(argv)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    if a.small:
        a.config = "small"
    tail = "" if a.config == "full" else a.config
    a.output_dir = a.output_dir or "runs/pipeline_study" + (f"_{tail}" if tail else "")
    a.results_dir = a.results_dir or str(Path(__file__).resolve().parent / "results" / tail)
    study = Study(a, CONFIGS[a.config])
    if a.stage:
        study.data()
        study.plan()[a.stage][0]()
        return 0
    todo = [name for name in study.plan() if not study.done(name)]
    child_argv = ["--output-dir", a.output_dir, "--results-dir", a.results_dir, "--config", a.config]
    out = study.run(a.parallel, child_argv)
    results = Path(a.results_dir).resolve()
    # The wall-clock time of each invocation that ran stages (a rerun that only redraws adds nothing).
    times = results / "run_time.json"
    runs = json.loads(times.read_text())["runs"] if times.exists() else []
    if todo:
        runs.append({"wall_s": study.seconds, "stages_run": todo, "parallel": a.parallel})
        _write_json(times, {"runs": runs}, indent=1)
    wall = sum(r["wall_s"] for r in runs)
    summary = summarize(out)
    command = "python examples/pipeline_study/run_study.py" + (f" --config {a.config}" if a.config != "full" else "")
    stages = {name: json.loads((study.stages / f"{name}.json").read_text()) for name in study.plan()}
    md = table(out, summary, stages, wall, command)
    _write_json(results / "summary.json", summary, indent=1)
    (results / "study.md").write_text(md, encoding="utf-8")
    plot(out, summary, results / "study.png")
    print(md)
    print(f"==> {results / 'study.md'}, {results / 'study.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
