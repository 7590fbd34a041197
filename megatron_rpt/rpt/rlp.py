"""RLP, reinforcement as a pretraining objective (arXiv 2510.01265), on the RPT loop (`--rl-reward information_gain`).

This module owns RLP's math, its sequences, its EMA teacher and its iteration; `rpt.loop` calls it at a few
marked points (docs/rlp.md lists every convention and where the paper is silent):

- For a corpus task (context x_<t, targets x_t..): the prompt is the context's token ids + the ids of
  "<think>" (no template); G thoughts c_i are sampled at --rpt-temperature. A thought is the sampled tokens
  up to and including the first "</think>" token subsequence (later tokens are dropped); one that does not
  close within --rpt-max-response-length gets the closing marker's ids appended (not sampled: no gradient),
  after its trailing end-of-document token is dropped.
- S_pred(c) = sum over the first N = --rlp-target-tokens targets of log p_theta(x | x_<t, "<think>", c,
  "</think>", earlier targets) (teacher forcing, the current network at temperature 1);
  S_ema = the same sum for the EMA teacher on context + targets (no thought); r(c) = S_pred(c) - S_ema,
  a constant for the update; A_i = G / (G - 1) (r_i - mean_j r_j) (`rlp_advantages`, eq. 7).
- The update is the loop's clipped surrogate (`PolicyForwardStep`) on the sampled thought tokens only, each
  thought's token losses weighted 1/|c_i| and the normaliser counting thoughts, so that Megatron-Core's
  per-token-loss division gives the paper's 1/(BG) sum_i 1/|c_i| sum_u (Algorithm 1, l. 13-14).
- `EMATeacher`: phi, model chunks in the policy's layout (`rpt.loop.frozen_model_chunks`), with an fp32
  shadow when the policy runs in bf16/fp16 (at tau = 0.999 a bf16 EMA would not move: (1 - tau) theta is
  below half an ulp of phi), updated after every optimizer step that updated, lazily set to theta at the
  first batch, saved with the checkpoint under "rlp_ema" (training.checkpointing's extras).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from megatron.core import parallel_state as ps

from megatron_rpt import distributed as dist
from megatron_rpt.config import ConfigError
from megatron_rpt.inference.base import SamplingConfig

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
REWARD_NAME = "information_gain"
EMA_KEY = "rlp_ema"
_SCORE_KEY = "target_log_probs"


def information_gain(s_pred: torch.Tensor, s_ema: torch.Tensor) -> torch.Tensor:
    """r = S_pred - S_ema (eq. 5): [groups, G] thoughts' log-evidence against [groups] no-think baselines."""
    return s_pred - s_ema.unsqueeze(1)


def rlp_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """A_i = G / (G - 1) (r_i - mean_j r_j) per group (eq. 7, the corrected inclusive mean), [groups, G]."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [groups, G>=2], got {tuple(rewards.shape)}")
    g = rewards.shape[1]
    r = rewards.double()
    return (g / (g - 1) * (r - r.mean(dim=1, keepdim=True))).float()


@dataclass
class Thought:
    """One sampled thought as RLP scores and trains it."""

    tokens: list        # the sampled tokens kept (they carry the gradient), "</think>" included when sampled
    log_probs: list     # the engine's log-probs of `tokens`
    closed: bool        # the thought sampled its "</think>"
    suffix: list        # not sampled: the closing marker's ids appended to an unclosed thought


def cut_thought(tokens: Sequence[int], log_probs: Sequence[float], close_ids: Sequence[int],
                eod: Optional[int]) -> Thought:
    """The thought of a sampled response: up to and including the first `close_ids` subsequence; without
    one, the response less a trailing end-of-document token, closed by an appended `close_ids`."""
    tokens, close = list(tokens), list(close_ids)
    for i in range(len(tokens) - len(close) + 1):
        if tokens[i:i + len(close)] == close:
            end = i + len(close)
            return Thought(tokens[:end], list(log_probs[:end]), True, [])
    end = len(tokens) - (1 if tokens and eod is not None and tokens[-1] == eod else 0)
    return Thought(tokens[:end], list(log_probs[:end]), False, close)


def scoring_sequence(prompt: Sequence[int], thought: Thought, targets: Sequence[int]) -> list:
    """context + "<think>" (the prompt) + thought + "</think>" + targets: S_pred scores the targets."""
    return list(prompt) + thought.tokens + thought.suffix + list(targets)


def thought_weight(thought: Thought) -> float:
    """1/|c| on each sampled thought token (0 for a thought that kept no sampled token)."""
    return 1.0 / len(thought.tokens) if thought.tokens else 0.0


def check_target_tokens(tasks: Sequence, path: Optional[str], n: int) -> None:
    """ConfigError naming `path` and the first task with fewer than `n` (--rlp-target-tokens) targets."""
    short = next((t for t in tasks if len(t.target_tokens) < n), None)
    if short is not None:
        raise ConfigError([f"--rlp-target-tokens {n}: {path}: task {short.id} has {len(short.target_tokens)} target "
                           f"token(s) (rebuild them with tools/build_rpt_data.py --target-tokens >= {n}, or lower "
                           f"the flag)"])


class EMATeacher:
    """The no-think baseline p_phi: phi <- tau phi + (1 - tau) theta after each optimizer step.

    `chunks` run the forwards (Float16Module-wrapped like the policy under --bf16/--fp16); the EMA itself is
    kept in fp32 (`shadow`: separate fp32 chunks then, the chunks themselves in fp32 runs) and the forward
    copy is the shadow rounded to the policy's dtype after each update. theta is the policy's model
    parameters (bf16 under --bf16: the weights the policy's own forwards use). Buffers are copied from
    the policy, not averaged. Saved as "rlp_ema" (the fp32 shadow) in full checkpoints."""

    checkpoint_key = EMA_KEY

    def __init__(self, cfg, job, decay: float):
        from megatron_rpt.rpt.loop import frozen_model_chunks
        from megatron_rpt.models.gpt import unwrap

        self.decay = decay
        self.chunks = frozen_model_chunks(cfg, job)
        half = cfg.training.bf16 or cfg.training.fp16
        self.shadow = (frozen_model_chunks(cfg, job, params_dtype=torch.float32) if half
                       else [unwrap(c) for c in self.chunks])
        self.initialised = False

    def _pairs(self, policy: list):
        """(theta, shadow, forward copy) per parameter and (policy, shadow, forward) per buffer, by name."""
        from megatron_rpt.models.gpt import unwrap

        params, buffers = [], []
        for p_chunk, s_chunk, f_chunk in zip(policy, self.shadow, self.chunks):
            for kind, out in (("named_parameters", params), ("named_buffers", buffers)):
                pol, sh, fw = (dict(getattr(unwrap(m), kind)()) for m in (p_chunk, s_chunk, f_chunk))
                if not set(pol) == set(sh) == set(fw):
                    raise RuntimeError(f"EMA teacher: {kind} differ from the policy's: {sorted(set(pol) ^ set(fw))}")
                out.extend((pol[n], sh[n], fw[n]) for n in sorted(pol))
        return params, buffers

    @torch.no_grad()
    def _refresh(self, policy: list, average: bool) -> None:
        params, buffers = self._pairs(policy)
        tau = self.decay
        for theta, shadow, forward in params:
            if average:
                shadow.mul_(tau).add_(theta.detach().to(shadow.dtype), alpha=1.0 - tau)
            else:
                shadow.copy_(theta.detach())
            if forward is not shadow:
                forward.copy_(shadow)
        for theta, shadow, forward in buffers:
            for b in {id(shadow): shadow, id(forward): forward}.values():
                b.copy_(theta)

    def initialise(self, policy: list) -> None:
        """phi <- theta (lazy init at the first batch; a no-op once initialised or loaded)."""
        if not self.initialised:
            self._refresh(policy, average=False)
            self.initialised = True

    def update(self, policy: list) -> None:
        """phi <- tau phi + (1 - tau) theta, in fp32, after an optimizer step that updated theta."""
        if not self.initialised:   # (the loop always scores a batch first; an update without one starts phi)
            self.initialise(policy)
            return
        self._refresh(policy, average=True)

    # training.checkpointing's extras protocol
    def sharded_state_dict(self, loading: bool = False) -> Optional[dict]:
        from megatron_rpt.checkpoint.sharded import model_state_dict
        if not (self.initialised or loading):
            return None
        return model_state_dict(self.shadow, key=EMA_KEY)

    @torch.no_grad()
    def load_state(self, loaded: dict) -> None:
        from megatron_rpt.checkpoint.sharded import load_model_state
        load_model_state(self.shadow, loaded, key=EMA_KEY)
        params, buffers = self._pairs(self.shadow)     # (shadow, shadow, forward): refresh the forward copy
        for _, shadow, forward in params + buffers:     # (persistent buffers come with the checkpoint)
            if forward is not shadow:
                forward.copy_(shadow)
        self.initialised = True


class RLP:
    """RLP's part of an `mrpt-rpt --rl-reward information_gain` run, driven by `rpt.loop._RPTJob`
    (`step`, `evaluate`, and the EMA update in its `_update`)."""

    def __init__(self, cfg, rpt_job):
        from megatron_rpt.training.checkpointing import load_extra_state

        r, tokenizer = cfg.rpt, rpt_job.job.tokenizer
        self.cfg, self.n = cfg, r.rlp_target_tokens
        self.open_ids, self.close_ids = list(tokenizer.tokenize(THINK_OPEN)), list(tokenizer.tokenize(THINK_CLOSE))
        self.eod = getattr(tokenizer, "eod", None)
        check_target_tokens(rpt_job.tasks, r.rpt_data, self.n)
        check_target_tokens(rpt_job.eval_tasks or [], r.rpt_eval_data, self.n)
        # scoring sequence: context + <think> + thought (<= max response) + </think> + N targets, all but the
        # last token fed, must fit --seq-length; so must the evaluation's one-token step after </think>
        self.max_context = (cfg.model.seq_length - r.rpt_max_response_length - len(self.open_ids)
                            - len(self.close_ids) - max(self.n - 1, 1))
        if self.max_context < 1:
            raise ConfigError([f"--seq-length {cfg.model.seq_length} leaves no room for a context: RLP's scoring "
                               f"sequence is context + {len(self.open_ids)} '<think>' tokens + up to "
                               f"--rpt-max-response-length {r.rpt_max_response_length} thought tokens + "
                               f"{len(self.close_ids)} '</think>' tokens + --rlp-target-tokens {self.n}"])
        self.ema = EMATeacher(cfg, rpt_job.job, r.rlp_ema_decay)
        rpt_job.state.checkpoint_extras.append(self.ema)
        c = cfg.checkpoint
        if rpt_job.driver.resumed_from and not (c.finetune or c.no_load_optim):
            found = load_extra_state(rpt_job.driver.resumed_from, self.ema)
            dist.print_rank_0(f"> RLP EMA teacher: {'loaded from' if found else 'not in'} "
                              f"{rpt_job.driver.resumed_from}{'' if found else ': set to the policy at the first batch'}")
        self.truncated = 0

    def context(self, task) -> list:
        """The context's last tokens that fit the scoring sequence (the oldest are dropped)."""
        return list(task.context_tokens)[-self.max_context:]

    def prompt(self, task) -> list:
        return self.context(task) + self.open_ids

    def score(self, job, model, sequences: list) -> list:
        """sum of log p(last N tokens | the tokens before them) of each sequence under `model` (list of
        chunks) at temperature 1, forward only through the loop's micro-batches and schedule; every rank of
        a model-parallel group gets the same values. Collective (call it on every rank)."""
        from megatron_rpt.rpt.loop import LogProbForwardStep, TrainSequence

        seqs = [TrainSequence(tokens=list(s), prompt_len=len(s) - self.n, rollout_log_probs=[0.0] * self.n,
                              advantage=0.0) for s in sequences]
        ((batches, length),) = job._mini_batches([seqs])
        with torch.no_grad():
            job._schedule(model, LogProbForwardStep(job.device, job.job.vocab_size, 1.0, _SCORE_KEY), batches, length,
                          forward_only=True)
        mb = self.cfg.training.micro_batch_size
        out = torch.zeros(len(batches) * mb, dtype=torch.float64)
        for b, batch in enumerate(batches):
            if _SCORE_KEY in batch:     # the last pipeline stage's
                out[b * mb:(b + 1) * mb] = (batch[_SCORE_KEY].double() * batch["loss_mask"].double()).sum(dim=1)
        out = out.to(job.device)
        if ps.get_context_parallel_world_size() > 1:      # each CP rank summed its chunks of the sequence
            torch.distributed.all_reduce(out, group=ps.get_context_parallel_group())
        if ps.get_pipeline_model_parallel_world_size() > 1:   # other stages hold zeros
            torch.distributed.all_reduce(out, group=ps.get_pipeline_model_parallel_group())
        return out[:len(sequences)].tolist()

    def thoughts_and_scores(self, job, tasks: list, rollouts: list) -> tuple[list, torch.Tensor, torch.Tensor]:
        """(thoughts [groups][G], S_pred [groups, G], S_ema [groups]); initialises the EMA at its first use."""
        self.ema.initialise(job.state.model)
        thoughts = [[cut_thought(o.tokens, o.log_probs, self.close_ids, self.eod) for o in group] for group in rollouts]
        targets = [list(t.target_tokens[:self.n]) for t in tasks]
        s_pred = self.score(job, job.state.model, [scoring_sequence(self.prompt(t), c, y) for t, group, y in
                                                    zip(tasks, thoughts, targets) for c in group])
        s_ema = self.score(job, self.ema.chunks, [self.context(t) + y for t, y in zip(tasks, targets)])
        g = len(rollouts[0]) if rollouts else 1
        return thoughts, torch.tensor(s_pred, dtype=torch.float64).view(-1, g), torch.tensor(s_ema, dtype=torch.float64)

    def step(self, job, iteration: int) -> dict:
        """One RLP iteration (rpt.loop's module docstring, with the reward and advantages above); returns
        the iteration's metrics."""
        from megatron_rpt.rpt.loop import TrainSequence, _sum_over_dp

        r = self.cfg.rpt
        t_start = time.perf_counter()
        tasks = job.batch_tasks()
        prompts = [self.prompt(task) for task in tasks]
        self.truncated += sum(len(task.context_tokens) > self.max_context for task in tasks)
        rollouts = job.rollouts(prompts, iteration)
        t_rollout = time.perf_counter() - t_start
        thoughts, s_pred, s_ema = self.thoughts_and_scores(job, tasks, rollouts)
        rewards = information_gain(s_pred, s_ema)
        advantages = rlp_advantages(rewards)
        _, keep = job.kept_groups(rewards, iteration)
        per_part = job.local_contexts // r.rpt_mini_batches
        parts = [[TrainSequence(tokens=prompts[g] + c.tokens, prompt_len=len(prompts[g]), rollout_log_probs=c.log_probs,
                                advantage=float(advantages[g, j]), sequence_weight=thought_weight(c))
                  for g in range(p * per_part, (p + 1) * per_part) if keep[g] for j, c in enumerate(thoughts[g])]
                 for p in range(r.rpt_mini_batches)]
        flat = [c for group in thoughts for c in group]
        local = [float(rewards.sum()), float(rewards.numel()), float(s_pred.sum()), float(s_ema.sum()), float(len(tasks)),
                 float(sum(len(c.tokens) for c in flat)), float(sum(c.closed for c in flat)), float(keep.sum()),
                 float((rewards > 0).sum()), float(sum(len(o.tokens) for group in rollouts for o in group))]
        (reward_sum, n_thoughts, pred_sum, ema_sum, n_groups, thought_tokens, closed, kept,
         positive, sampled) = _sum_over_dp(local, job.device)
        report, grad_norms, t_train = job.train(parts)
        n, groups = max(n_thoughts, 1.0), max(n_groups, 1.0)
        metrics = {
            "reward": reward_sum / n, "s_pred": pred_sum / n, "s_ema": ema_sum / groups,
            "positive_gain_fraction": positive / n, "thought_length": thought_tokens / n, "closed_fraction": closed / n,
            "kept_group_fraction": kept / groups,
            **job.update_metrics(report, grad_norms, t_rollout=t_rollout, t_train=t_train, rollout_tokens=sampled,
                                 train_tokens=report["train_tokens"], truncated=self.truncated),
        }
        return metrics     # the loop checks that the policy loss is finite

    @staticmethod
    def log_fields(metrics: dict) -> str:
        """RLP's head of the loop's printed iteration line."""
        return (f"information gain: {metrics['reward']:.4f} | S_pred: {metrics['s_pred']:.4f} | "
                f"S_ema: {metrics['s_ema']:.4f} | thought length: {metrics['thought_length']:.1f} | "
                f"closed: {metrics['closed_fraction']:.3f} | ")

    def evaluate(self, job, tasks: list, seed: int) -> dict:
        """Held-out metrics of `tasks` (this rank's share; sums over DP ranks): the mean information gain of
        a greedy thought and of --rpt-eval-samples sampled ones (at --rpt-temperature), the no-think
        next-token accuracy (argmax p(x_t | x_<t) == x_t, on the same context) and the after-thought
        accuracy (argmax p(x_t | x_<t, c) == x_t) for both kinds of thought. Collective."""
        from megatron_rpt.rpt.loop import _sum_over_dp

        r = self.cfg.rpt
        k = r.rpt_eval_samples
        one = SamplingConfig(max_new_tokens=1, temperature=1.0, top_k=1, seed=seed, stop_at_eod=False)
        greedy = SamplingConfig(max_new_tokens=r.rpt_max_response_length, temperature=1.0, top_k=1, seed=seed)
        no_think = job.engine.generate([self.context(task) for task in tasks], 1, one)
        sums = [float(len(tasks)), float(sum(bool(o[0].tokens) and o[0].tokens[0] == task.target_tokens[0]
                                             for task, o in zip(tasks, no_think)))]
        for sampling, n in ((greedy, 1), (job.sampling(seed), k)):
            rollouts = job.engine.generate([self.prompt(task) for task in tasks], n, sampling)
            thoughts, s_pred, s_ema = self.thoughts_and_scores(job, tasks, rollouts)
            gains = information_gain(s_pred, s_ema) if tasks else torch.zeros(0, n)
            after = job.engine.generate([scoring_sequence(self.prompt(task), c, [])
                                         for task, group in zip(tasks, thoughts) for c in group], 1, one)
            hits = [bool(after[i * n + j][0].tokens) and after[i * n + j][0].tokens[0] == task.target_tokens[0]
                    for i, task in enumerate(tasks) for j in range(n)]
            sums += [float(gains.sum()) / n, float(sum(hits)) / n, float(sum(c.closed for g in thoughts for c in g)) / n]
        (n_tasks, no_think_hits, gain_g, acc_g, closed_g, gain_s, acc_s, closed_s) = _sum_over_dp(sums, job.device)
        count, n_tasks = int(n_tasks), max(n_tasks, 1.0)
        return {"tasks": count, "no_think_acc": no_think_hits / n_tasks,
                "info_gain_greedy": gain_g / n_tasks, "after_thought_acc_greedy": acc_g / n_tasks,
                "closed_fraction_greedy": closed_g / n_tasks, f"info_gain@{k}": gain_s / n_tasks,
                f"after_thought_acc@{k}": acc_s / n_tasks, f"closed_fraction@{k}": closed_s / n_tasks}
