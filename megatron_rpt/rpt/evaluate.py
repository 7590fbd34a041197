"""RL evaluation on held-out tasks: RPT's Table 1 protocol, plus pass@k / avg@k / cons@k for any text reward.

- Standard mode (RPT task files only): the argmax next token of the policy given the raw context
  tokens equals the first target token (greedy, one token, through the rollout engine).
- Reasoning mode: k responses per task to the prompt template at the sampling settings; each is
  scored by the run's reward (`rpt.rewards.RewardSpec.score`: prefix match for RPT, the final answer
  for RLVR). avg@k = mean reward; pass@j for j = 1, 2, 4, ... <= k with the unbiased estimator
  1 - C(k - c, j) / C(k, j) (c correct of k; Chen et al. 2021); cons@k = the reward of the majority
  answer: responses vote with `RewardSpec.prediction` (RPT: the `\\boxed{}` content verbatim; RLVR:
  the normalised answer, plain numbers by exact value, so "0.5" and "1/2" are one vote; answers that
  only math-verify would call equal, like "\\frac{1}{2}" and "0.5", vote apart: merging them would
  take k^2 symbolic comparisons per task), responses without an answer do not vote, a tie goes to
  the earliest, and the reward is the first winning response's.
Each metric is reported over all tasks ("all") and per split: RPT's nested difficulty splits (easy /
medium / hard: proxy entropy > 0.5 / 1.0 / 1.5, as tagged by tools/build_rpt_data.py), a problem file's
own splits (e.g. CHAMP categories, `eval_splits`).
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Optional, Sequence

from megatron_rpt.inference.base import RolloutEngine, SamplingConfig

SPLITS = ("all", "easy", "medium", "hard")


def eval_splits(tasks: Sequence, corpus: bool) -> tuple[str, ...]:
    """The reported splits: RPT's fixed ones for corpus tasks (so the keys do not depend on the data),
    "all" and the problems' own splits (sorted) otherwise. Computed from all held-out tasks, so every
    rank's count vector has the same layout."""
    if corpus:
        return SPLITS
    return ("all", *sorted({s for t in tasks for s in t.splits}))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (k <= n): 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):   # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def majority_vote_reward(responses: Sequence[str], spec, task) -> float:
    """cons@k of one task under the reward `spec` (see the module docstring)."""
    votes = [(p, r) for r, p in ((r, spec.prediction(r)) for r in responses) if p]
    if not votes:
        return 0.0
    counts = Counter(p for p, _ in votes)
    best = max(counts.values())
    winner = next(r for p, r in votes if counts[p] == best)
    return spec.score(winner, task)


def pass_ks(k: int) -> list[int]:
    out, j = [], 1
    while j <= k:
        out.append(j)
        j *= 2
    if out[-1] != k:
        out.append(k)
    return out


def evaluate_tasks(engine: RolloutEngine, tasks: Sequence, prompt_ids: Callable, *, spec, k: int,
                   sampling: SamplingConfig, reduce: Optional[Callable[[list], list]] = None,
                   standard: bool = True, max_context_tokens: Optional[int] = None,
                   splits: Sequence[str] = SPLITS) -> dict:
    """Metrics of `tasks` (this rank's share; `reduce` sums count vectors over ranks) under the text
    reward `spec` (an `rpt.rewards.RewardSpec`), per split of `splits` (the same on every rank).

    `prompt_ids(task)` gives the token ids of the task's reasoning prompt; standard mode (corpus tasks)
    sees the last `max_context_tokens` context tokens. Collective for the embedded engine (every rank of
    a model-parallel group passes the same tasks; a rank without tasks still calls the engine, whose
    lockstep mode under expert parallelism needs every rank)."""
    if spec.score is None:
        raise ValueError(f"reward {spec.name!r} is scored by the model: evaluate_tasks scores text rewards")
    js = pass_ks(k)
    # per split: tasks, standard correct, reward sum (avg@k), cons@k sum, pass@j sums
    width = 4 + len(js)
    counts = [0.0] * (len(splits) * width)
    std_hits = [False] * len(tasks)
    if standard:
        greedy = SamplingConfig(max_new_tokens=1, temperature=1.0, top_k=1, seed=sampling.seed, stop_at_eod=False)
        cut = -max_context_tokens if max_context_tokens else 0
        out = engine.generate([list(t.context_tokens)[cut:] for t in tasks], 1, greedy)
        std_hits = [bool(o[0].tokens) and o[0].tokens[0] == t.target_tokens[0] for t, o in zip(tasks, out)]
    rollouts = engine.generate([prompt_ids(t) for t in tasks], k, sampling)
    for task, hit, group in zip(tasks, std_hits, rollouts):
        texts = [o.text for o in group]
        rewards = [spec.score(text, task) for text in texts]
        c = sum(r == 1.0 for r in rewards)     # pass@j counts fully correct responses
        row = [1.0, float(hit), float(sum(rewards)) / k, majority_vote_reward(texts, spec, task)]
        row += [pass_at_k(k, c, j) for j in js]
        for s, name in enumerate(splits):
            if name == "all" or name in task.splits:
                for i, v in enumerate(row):
                    counts[s * width + i] += v
    if reduce is not None:
        counts = reduce(counts)
    metrics: dict = {}
    for s, name in enumerate(splits):
        n = counts[s * width]
        metrics[f"{name}/tasks"] = int(n)
        if n == 0:
            continue
        if standard:
            metrics[f"{name}/standard_acc"] = counts[s * width + 1] / n
        metrics[f"{name}/avg@{k}"] = counts[s * width + 2] / n
        metrics[f"{name}/cons@{k}"] = counts[s * width + 3] / n
        for i, j in enumerate(js):
            metrics[f"{name}/pass@{j}"] = counts[s * width + 4 + i] / n
    return metrics
