"""RPT evaluation: the paper's Table 1 protocol on held-out tasks, plus pass@k / avg@k / cons@k.

- Standard mode: the argmax next token of the policy given the raw context tokens equals the first
  target token (greedy, one token, through the rollout engine).
- Reasoning mode: k responses per task to the prompt template at the sampling settings; each is
  scored by the prefix-match reward. avg@k = mean reward; pass@j for j = 1, 2, 4, ... <= k with the
  unbiased estimator 1 - C(k - c, j) / C(k, j) (c correct of k; Chen et al. 2021); cons@k = the
  reward of the majority prediction (the most frequent extracted `\\boxed{}` content; ties go to
  the earliest; responses without a prediction do not vote).
Each metric is reported over all tasks and per nested difficulty split (easy / medium / hard:
proxy entropy > 0.5 / 1.0 / 1.5, as tagged by tools/build_rpt_data.py).
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Optional, Sequence

from megatron_rpt.inference.base import RolloutEngine, SamplingConfig
from megatron_rpt.rpt.reward import extract_prediction, prediction_reward, prefix_match_reward

SPLITS = ("all", "easy", "medium", "hard")


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


def majority_vote_reward(responses: Sequence[str], target_token_bytes: Sequence[bytes]) -> float:
    """cons@k of one task: the reward of the most frequent prediction (see the module docstring)."""
    predictions = [p for p in (extract_prediction(r) for r in responses) if p]
    if not predictions:
        return 0.0
    counts = Counter(predictions)
    best = max(counts.values())
    winner = next(p for p in predictions if counts[p] == best)
    return prediction_reward(winner, target_token_bytes)


def pass_ks(k: int) -> list[int]:
    out, j = [], 1
    while j <= k:
        out.append(j)
        j *= 2
    if out[-1] != k:
        out.append(k)
    return out


def evaluate_tasks(engine: RolloutEngine, tasks: Sequence, prompt_ids: Callable, *, k: int,
                   sampling: SamplingConfig, reduce: Optional[Callable[[list], list]] = None,
                   standard: bool = True, max_context_tokens: Optional[int] = None) -> dict:
    """Metrics of `tasks` (this rank's share; `reduce` sums count vectors over ranks).

    `prompt_ids(task)` gives the token ids of the task's reasoning prompt; standard mode sees the
    last `max_context_tokens` context tokens. Collective for the embedded engine (every rank of a
    model-parallel group passes the same tasks; a rank without tasks still calls the engine, whose
    lockstep mode under expert parallelism needs every rank)."""
    js = pass_ks(k)
    # per split: tasks, standard correct, reward sum (avg@k), cons@k sum, pass@j sums
    width = 4 + len(js)
    counts = [0.0] * (len(SPLITS) * width)
    std_hits = [False] * len(tasks)
    if standard:
        greedy = SamplingConfig(max_new_tokens=1, temperature=1.0, top_k=1, seed=sampling.seed, stop_at_eod=False)
        cut = -max_context_tokens if max_context_tokens else 0
        out = engine.generate([list(t.context_tokens)[cut:] for t in tasks], 1, greedy)
        std_hits = [bool(o[0].tokens) and o[0].tokens[0] == t.target_tokens[0] for t, o in zip(tasks, out)]
    rollouts = engine.generate([prompt_ids(t) for t in tasks], k, sampling)
    for task, hit, group in zip(tasks, std_hits, rollouts):
        target = task.target_token_bytes
        rewards = [prefix_match_reward(o.text, target) for o in group]
        c = int(sum(rewards))
        row = [1.0, float(hit), float(sum(rewards)) / k, majority_vote_reward([o.text for o in group], target)]
        row += [pass_at_k(k, c, j) for j in js]
        for s, name in enumerate(SPLITS):
            if name == "all" or name in task.splits:
                for i, v in enumerate(row):
                    counts[s * width + i] += v
    if reduce is not None:
        counts = reduce(counts)
    metrics: dict = {}
    for s, name in enumerate(SPLITS):
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
