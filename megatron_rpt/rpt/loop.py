"""The RL job (`mrpt-rpt`): tasks -> rollouts -> rewards -> GRPO update, on the shared driver.

The reward is `--rl-reward` (`rpt.rewards`): RPT's prefix match on corpus task files (the default),
RLVR's final-answer check on problem files, RLP's information gain (below) on corpus task files; the
task files are read as the reward needs them and a file of the other kind is refused at start-up.

One iteration:
1. the next `--rpt-contexts-per-step` tasks of a seeded per-epoch permutation (the position is the
   checkpoint's consumed-samples count, so a resumed run continues with the same contexts); each
   data-parallel rank takes its contiguous share;
2. the rollout engine samples `--rpt-group-size` responses per context at `--rpt-temperature` T,
   with their log-probs log softmax(z / T) (the embedded engine is collective over the
   model-parallel group; its seed is a function of seed, iteration and DP rank, so a resumed run
   samples the same rollouts);
3. the reward scores each response (`_rewards`, the one place rewards are computed): RPT's prefix
   match against the target token bytes, RLVR's answer check against the reference answer;
4. `rpt.grpo` turns rewards into group advantages; from `--rpt-dynamic-sampling-start` on, groups
   whose rewards are all equal are dropped;
5. the old policy's log-probs are recomputed by the trainer, forward only, on the very micro-batches
   of the update (so the first update's ratio is exactly 1 in any precision); the engine's are kept
   to measure the engine-trainer mismatch (mean/max |logp_old - logp_engine| and the k3 KL between
   them) and, with `--rpt-tis-cap C`, to weight each token by min(exp(logp_old - logp_engine), C)
   (truncated importance sampling, detached). `--rpt-use-rollout-logprobs` skips the recompute and
   takes the engine's as the old policy;
6. the local contexts are split into `--rpt-mini-batches` N equal parts; each part's prompt +
   response sequences go through Megatron-Core's forward-backward schedule (TP/PP/DP/EP) with the
   policy's log-probs at T (`grpo.policy_log_probs`) and the clipped surrogate averaged over all
   response tokens of the part's global batch (`calculate_per_token_loss`), then the optimizer
   steps: N updates per rollout batch. A part that kept no token on any rank skips its update on
   every rank.
With expert parallelism the ranks of an expert all-to-all hold different data, so every forward
they run is matched: the engine decodes in lockstep (`MegatronEngine(lockstep_group=...)`) and the
update pads every rank to the same micro-batch count and length (padding carries no loss).
With `--rl-reward information_gain` (RLP, `rpt.rlp`; docs/rlp.md) the prompts, rewards, advantages,
metrics and evaluation are RLP's (thoughts after "<think>", scored by the information gain over an EMA
teacher, updated with per-thought weights) and the EMA teacher is updated after each optimizer step;
the places are marked "RLP".
Resuming, the iteration loop, --eval-interval / --save-interval and the exit conditions are the
shared `training.driver.TrainingDriver`; metrics go to stdout every `--log-interval` and to
TensorBoard; evaluation (`rpt.evaluate`) runs on held-out tasks at the start, every
`--eval-interval` and at the end.
"""

from __future__ import annotations

import json
import math
import os
import time
import zlib
from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import torch
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_rpt import distributed as dist
from megatron_rpt.config import ConfigError
from megatron_rpt.config.schema import RunConfig
from megatron_rpt.config.validation import fp8_row_multiple, sequence_length_multiple
from megatron_rpt.validate import validate_rpt_config
from megatron_rpt.fileio import atomic_open
from megatron_rpt.inference.base import RolloutEngine, SamplingConfig
from megatron_rpt.inference.external.collective import rollout_group
from megatron_rpt.models.gpt import token_head
from megatron_rpt.rpt.evaluate import eval_splits, evaluate_tasks
from megatron_rpt.rpt.grpo import group_advantages, informative_groups, policy_log_probs, policy_loss
from megatron_rpt.rpt.prompts import build_prompt, load_template
from megatron_rpt.rpt.rewards import check_task_file, get_reward, load_reward_tasks
from megatron_rpt.rpt.tasks import TaskError
from megatron_rpt.training.context_parallel import split_for_this_cp_rank
from megatron_rpt.training.driver import SignalFlag, TrainingDriver
from megatron_rpt.training.setup import setup_job
from megatron_rpt.training.params_norm import params_l2_norm
from megatron_rpt.training.sinks import writes_scalars
from megatron_rpt.training.step import (grads_are_finite, optimizer_step, reduce_from_last_stage,
                                       release_unused_memory)
from megatron_rpt.training.timers import TimerReport

# Per-micro-batch sums reduced over the batch (order of the packed report tensor).
# "count" is what the loss is normalised by (Megatron-Core's per-token-loss count): the tokens (RPT) or the
# thoughts (RLP, rpt.rlp).
_SUMS = ("loss", "tokens", "entropy", "ratio", "clipped", "kl", "approx_kl", "abs_logp_diff", "mismatch_kl",
         "tis_weight", "count")


@dataclass
class RPTResult:
    iteration: int
    start_iteration: int
    metrics: dict = field(default_factory=dict)        # iteration -> logged metrics
    evaluations: dict = field(default_factory=dict)    # iteration -> rpt.evaluate metrics
    saved: list = field(default_factory=list)
    resumed_from: Optional[str] = None
    exit_reason: str = "train_iters"


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions)."""
    return zlib.crc32(" ".join(str(int(p)) for p in parts).encode()) * 2654435761 % (2 ** 63)


class ContextSampler:
    """Global context index -> task: one seeded permutation per pass over the tasks."""

    def __init__(self, num_tasks: int, seed: int):
        if num_tasks < 1:
            raise ValueError("no tasks")
        self.n, self.seed = num_tasks, seed
        self._epoch, self._perm = -1, None

    def __call__(self, index: int) -> int:
        epoch, i = divmod(index, self.n)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(_seed(self.seed, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g).tolist()
        return self._perm[i]


@dataclass
class TrainSequence:
    """One prompt + response for the policy update (labels are the next tokens)."""

    tokens: list                # prompt + response ids
    prompt_len: int
    rollout_log_probs: list     # per response token, as the rollout engine reported them
    advantage: float
    # RLP (rpt.rlp): each response token's loss is weighted by this (1/|c|) and the sequence counts 1 in
    # the loss's normaliser instead of its token count; None: plain token mean (RPT)
    sequence_weight: Optional[float] = None


def _micro_batches(seqs: list, micro_batch_size: int, length_multiple: int, max_length: int,
                   attention_mask: bool, *, length: Optional[int] = None, count: int = 1) -> tuple[list, int]:
    """Right-padded micro-batches of one length L (Megatron's schedule needs one shape per step), at
    least `count` of them (the extra ones carry no loss); `length` forces L (>= what the sequences
    need). Position j predicts tokens[j + 1]; only response tokens carry loss. `old_log_probs` starts
    as the engine's; the trainer's recompute replaces it. With `sequence_weight`s (RLP) the batch also
    has `token_weight` (the weight on response positions) and `loss_count` (1 at position 0 of each
    sequence, so that one context-parallel rank counts it)."""
    weighted = any(s.sequence_weight is not None for s in seqs)
    longest = max((len(s.tokens) - 1 for s in seqs), default=1)
    if longest > max_length:
        # the callers cap prompts at seq_length - max response length; reaching this is a bug, not input
        raise ValueError(f"a prompt + response of {longest + 1} tokens exceeds --seq-length {max_length} + 1")
    need = min(max_length, -(-longest // length_multiple) * length_multiple)
    if length is None:
        length = need
    elif length < need:
        raise ValueError(f"micro-batch length {length} < {need} needed by the sequences")
    batches = []
    n_batches = max(count, 1, -(-len(seqs) // micro_batch_size))
    for b in range(n_batches):
        chunk = seqs[b * micro_batch_size:(b + 1) * micro_batch_size]
        tokens = torch.zeros(micro_batch_size, length, dtype=torch.long)
        labels = torch.zeros(micro_batch_size, length, dtype=torch.long)
        mask = torch.zeros(micro_batch_size, length)
        engine = torch.zeros(micro_batch_size, length)
        adv = torch.zeros(micro_batch_size, 1)
        weight, count = torch.zeros(micro_batch_size, length), torch.zeros(micro_batch_size, length)
        for i, s in enumerate(chunk):
            ids = torch.tensor(s.tokens, dtype=torch.long)
            n = len(s.tokens) - 1
            tokens[i, :n] = ids[:-1]
            labels[i, :n] = ids[1:]
            start = s.prompt_len - 1             # the position whose label is the first response token
            mask[i, start:n] = 1.0
            engine[i, start:n] = torch.tensor(s.rollout_log_probs, dtype=torch.float32)
            adv[i, 0] = s.advantage
            if weighted:
                weight[i, start:n] = s.sequence_weight
                count[i, 0] = 1.0
        batch = {"tokens": tokens, "labels": labels, "loss_mask": mask, "rollout_log_probs": engine,
                 "old_log_probs": engine.clone(), "advantages": adv,
                 "position_ids": torch.arange(length).unsqueeze(0).expand(micro_batch_size, length).contiguous()}
        if weighted:
            batch.update(token_weight=weight, loss_count=count)
        if attention_mask:
            batch["attention_mask"] = torch.triu(torch.ones(1, 1, length, length, dtype=torch.bool), diagonal=1)
        batches.append(batch)
    return batches, length


class LogProbForwardStep:
    """Forward-only step that stores log pi_T(labels) [b, s] of `model` in the host batch dict under
    `key` (last pipeline stage only): the old policy's recompute (`old_log_probs`, the trainer's own
    model before the update) and the frozen reference of the KL term (`ref_log_probs`)."""

    def __init__(self, device: torch.device, vocab_size: int, temperature: float, key: str):
        self.device, self.vocab_size, self.temperature, self.key = device, vocab_size, temperature, key

    def __call__(self, data_iterator, model):
        host = next(data_iterator)
        batch = {k: v.to(self.device) for k, v in host.items()}
        with token_head(model, partial(policy_log_probs, vocab_size=self.vocab_size, temperature=self.temperature,
                                       overwrite_logits=True)):
            output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])

        def stash(log_probs):
            host[self.key] = log_probs.detach().float().cpu()
            zero = torch.zeros((), device=self.device)
            return zero, torch.zeros((), dtype=torch.int, device=self.device), {}
        return output, stash


class PolicyForwardStep:
    """Megatron forward_step_func for the GRPO update: policy log-probs at T (the model's per-token
    head) and the clipped surrogate against `old_log_probs` (plus kl_beta x k3 KL to the reference
    where the batch carries `ref_log_probs`; times the truncated IS weight with `tis_cap`).

    The engine-trainer mismatch is measured per token between the trainer's log-probs of the policy
    that sampled (the recomputed old ones; with `recomputed` False, this forward's) and the engine's:
    |difference| and k3 = exp(d) - d - 1, d = logp_trainer - logp_engine (an estimate of
    KL(engine || trainer) from the engine's samples)."""

    def __init__(self, device: torch.device, vocab_size: int, temperature: float, eps_low: float, eps_high: float,
                 kl_beta: float = 0.0, tis_cap: Optional[float] = None, recomputed: bool = True):
        self.device, self.vocab_size, self.temperature = device, vocab_size, temperature
        self.eps_low, self.eps_high, self.kl_beta = eps_low, eps_high, kl_beta
        self.tis_cap, self.recomputed = tis_cap, recomputed

    def _loss(self, batch: dict, stats: dict, logp: torch.Tensor):
        mask = batch["loss_mask"]
        keep = mask > 0
        old, engine = batch["old_log_probs"], batch["rollout_log_probs"]
        loss, info = policy_loss(logp, old, batch["advantages"], eps_low=self.eps_low, eps_high=self.eps_high,
                                 ref_log_probs=batch.get("ref_log_probs"), kl_beta=self.kl_beta)
        weight = torch.ones_like(old)
        if self.tis_cap is not None:
            weight = torch.clamp(torch.exp(old - engine), max=self.tis_cap)   # data: no gradient
            loss = loss * weight
        d = torch.where(keep, (old if self.recomputed else logp.detach()) - engine, 0.0)
        tokens = mask.sum()
        if "token_weight" in batch:     # RLP: sum_i 1/|c_i| sum_u loss, normalised by the thoughts
            total, count = torch.sum(loss * mask * batch["token_weight"]), batch["loss_count"].sum()
        else:
            total, count = torch.sum(loss * mask), tokens

        def s(x):
            return torch.where(keep, x.float(), 0.0).sum()

        diff = d.abs()
        report = torch.stack([total.detach(), tokens, s(stats["entropy"].t()), s(info["ratio"]), s(info["clipped"]),
                              s(info["kl"]), s(info["approx_kl"]), diff.sum(), s(torch.expm1(d) - d), s(weight), count])
        return total, count.round().to(torch.int), {"rpt": report, "max_abs_logp_diff": diff.max()}

    def __call__(self, data_iterator, model):
        batch = {k: v.to(self.device) for k, v in next(data_iterator).items()}
        stats: dict = {}    # per-token statistics [s, b] of the policy's distribution (entropy)
        with token_head(model, partial(policy_log_probs, vocab_size=self.vocab_size, temperature=self.temperature,
                                       stats=stats, overwrite_logits=True)):
            logp = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])
        return logp, partial(self._loss, batch, stats)


def _reduce_report(outputs: list, device: torch.device) -> tuple[dict, float]:
    """The packed micro-batch reports summed over micro-batches and DP ranks, and the max of
    |logp - logp_engine|; every pipeline stage receives the last stage's values."""
    total = torch.zeros(len(_SUMS), dtype=torch.float64, device=device)
    peak = torch.zeros(1, dtype=torch.float64, device=device)
    for out in outputs:
        total += out["rpt"].to(torch.float64)
        peak = torch.maximum(peak, out["max_abs_logp_diff"].to(torch.float64).view(1))
    reduce_from_last_stage(total)
    reduce_from_last_stage(peak, op=torch.distributed.ReduceOp.MAX)   # |differences| >= 0
    return dict(zip(_SUMS, total.tolist())), float(peak.item())


def _summarise(sums: dict, peak: float) -> dict:
    """Token means of the summed reports (over every update of the iteration)."""
    n = max(sums["tokens"], 1.0)
    return {"policy_loss": sums["loss"] / max(sums["count"], 1.0), "train_tokens": int(sums["tokens"]),
            "entropy": sums["entropy"] / n, "ratio": sums["ratio"] / n, "clip_fraction": sums["clipped"] / n,
            "kl": sums["kl"] / n, "approx_kl": sums["approx_kl"] / n,
            "mean_abs_logp_diff": sums["abs_logp_diff"] / n, "max_abs_logp_diff": peak,
            "mismatch_kl": sums["mismatch_kl"] / n, "tis_weight": sums["tis_weight"] / n}


def _sum_over_dp(values: list, device: torch.device) -> list:
    """Element-wise sum over data-parallel ranks (tensor-, pipeline- and context-parallel ranks of one
    data-parallel rank hold the same rollouts, hence the same values)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, group=ps.get_data_parallel_group())
    return t.tolist()


def build_engine(cfg: RunConfig, job) -> RolloutEngine:
    r = cfg.rpt
    if r.rollout_engine == "megatron":
        from megatron_rpt.inference.megatron_engine import MegatronEngine
        # FP8 GEMMs need aligned row counts and a decode step has one row per sequence: batches are padded.
        # Expert parallelism: the expert all-to-alls need every rank to run the same forwards (lockstep).
        return MegatronEngine(job.state.model, job.tokenizer, padded_vocab_size=job.vocab_size,
                              max_batch_size=r.rollout_max_batch_size, max_sequence_length=cfg.model.seq_length,
                              row_multiple=fp8_row_multiple(cfg) if cfg.fp8.fp8_format else 1,
                              lockstep_group=torch.distributed.group.WORLD if _lockstep(cfg) else None)
    from megatron_rpt.inference.external import OpenAICompatibleEngine
    from megatron_rpt.training.checkpointing import save_weights
    # --rollout-frozen-policy: the server keeps its weights, nothing is written or exported.
    writer = None if r.rollout_frozen_policy else partial(save_weights, state=job.state, cfg=cfg)
    return OpenAICompatibleEngine(
        r.rollout_url, eod_token_id=job.tokenizer.eod, reload=r.rollout_reload,
        reload_endpoint=r.rollout_reload_endpoint, restart_command=r.rollout_restart_command,
        sync_dir=r.rollout_sync_dir or os.path.join(cfg.checkpoint.save, "rollout_sync"),
        logprobs=r.rollout_logprobs, weights_writer=writer)


def _lockstep(cfg: RunConfig) -> bool:
    """Whether ranks holding different data share collectives inside the forward (the expert
    all-to-alls of expert parallelism), so that every rank must run the same forwards. The same
    answer on every rank (configuration only)."""
    return cfg.parallel.expert_model_parallel_size > 1


def frozen_model_chunks(cfg: RunConfig, job, *, params_dtype: Optional[torch.dtype] = None) -> list:
    """This rank's model chunks in the policy's layout (TP/PP/EP, vocab-parallel), without DDP or gradients,
    in eval mode: the KL reference and RLP's EMA teacher (rpt.rlp). Under --bf16/--fp16 they are wrapped
    in Float16Module like the policy, unless `params_dtype` asks for bare chunks of that dtype. The weights
    are not initialised (no RNG is drawn): the caller loads or copies them."""
    from megatron.core.transformer.module import Float16Module

    from megatron_rpt.models.gpt import build_model_chunks, transformer_config

    config = transformer_config(cfg, job.platform)   # a new object: set, not replaced (no second __post_init__)
    config.perform_initialization = False
    if params_dtype is not None:
        config.params_dtype = params_dtype
    chunks = build_model_chunks(cfg, job.platform, job.vocab_size, job.device, config)
    if (cfg.training.bf16 or cfg.training.fp16) and params_dtype is None:
        chunks = [Float16Module(config, c) for c in chunks]
    for chunk in chunks:
        chunk.requires_grad_(False)
        chunk.eval()
    return chunks


def build_reference(cfg: RunConfig, job) -> list:
    """The frozen reference policy of the KL term: `frozen_model_chunks` with the weights of
    --rpt-ref-load's latest checkpoint."""
    import types

    from megatron_rpt.checkpoint.layout import CheckpointError
    from megatron_rpt.training.checkpointing import load_checkpoint

    chunks = frozen_model_chunks(cfg, job)
    if load_checkpoint(cfg.rpt.rpt_ref_load, types.SimpleNamespace(model=chunks, optimizer=None), cfg) is None:
        raise CheckpointError(f"--rpt-ref-load: no checkpoint in {cfg.rpt.rpt_ref_load}")
    return chunks


class _RPTJob:
    """One RPT run's pieces and its iteration (`step`) and evaluation (`evaluate`) for the driver."""

    def __init__(self, cfg: RunConfig, job, driver: TrainingDriver, result: RPTResult):
        r, t, m = cfg.rpt, cfg.training, cfg.model
        self.cfg, self.job, self.driver, self.result = cfg, job, driver, result
        self.device, self.state = job.device, job.state
        self.reward = get_reward(r.rl_reward)
        self.tasks = load_reward_tasks(self.reward, r.rpt_data, "--rpt-data")
        self.eval_tasks = (load_reward_tasks(self.reward, r.rpt_eval_data, "--rpt-eval-data")
                           if r.rpt_eval_data else None)
        if self.eval_tasks is not None and r.rpt_eval_max_tasks:
            self.eval_tasks = self.eval_tasks[:r.rpt_eval_max_tasks]
        self.corpus = self.reward.task_kind == "corpus"
        # The ranks sharing a data-parallel rank (TP x PP, x CP) score the same rollouts; a reward with a
        # wall-clock limit (math-verify's) could still differ between them, so the first rank's are used.
        self.reward_group = rollout_group()
        self.eval_splits = eval_splits(self.eval_tasks or [], self.corpus)
        self.template = load_template(r.rpt_prompt_template or self.reward.default_template)
        self.chat = getattr(job.tokenizer, "_tok", None) if r.rpt_chat_template else None
        if r.rpt_chat_template and self.chat is None:
            raise ConfigError(["--rpt-chat-template needs --tokenizer-type HuggingFaceTokenizer (a chat template)"])
        self.prompt_cache: dict = {}
        self.max_prompt = m.seq_length - r.rpt_max_response_length
        self.truncated = 0
        self.dp, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.local_contexts = r.rpt_contexts_per_step // self.dp
        self.sampler = ContextSampler(len(self.tasks), t.seed)
        self.lockstep = _lockstep(cfg)
        self.policy_step = PolicyForwardStep(
            self.device, job.vocab_size, r.rpt_temperature, r.grpo_clamp_eps_lower, r.grpo_clamp_eps_upper,
            r.grpo_kl_beta, tis_cap=r.rpt_tis_cap, recomputed=not r.rpt_use_rollout_logprobs)
        self.reference = None
        if r.grpo_kl_beta > 0:
            self.reference = build_reference(cfg, job)
            dist.print_rank_0(f"> KL reference policy: {r.rpt_ref_load} (beta {r.grpo_kl_beta})")
        self.engine = build_engine(cfg, job)
        self.rlp = None         # RLP (rpt.rlp): the information-gain reward, its EMA teacher and evaluation
        if r.rl_reward == "information_gain":
            from megatron_rpt.rpt.rlp import RLP
            self.rlp = RLP(cfg, self)
        self.timers = TimerReport(job.state.config.timers, cfg.logging)
        self.last_printed = driver.iteration          # the start iteration: timers cover what follows

    def close(self) -> None:
        self.engine.close()

    def prompt_ids(self, task) -> list:
        """The task's prompt ids; a corpus context too long for --seq-length minus the response budget
        loses its oldest text (the paper caps prompts at 4,096 tokens), never its end. A problem is
        never cut (it would lose what it asks): one too long is an error naming it."""
        if task.id not in self.prompt_cache:
            tokenizer, template, chat = self.job.tokenizer, self.template, self.chat
            context = task.prompt_content
            ids = tokenizer.tokenize(build_prompt(context, template, chat_tokenizer=chat))
            if len(ids) > self.max_prompt and not self.corpus:
                raise TaskError(f"problem {task.id!r}: its prompt has {len(ids)} tokens, more than --seq-length "
                                f"{self.cfg.model.seq_length} minus --rpt-max-response-length "
                                f"{self.cfg.rpt.rpt_max_response_length}")
            while len(ids) > self.max_prompt and context:
                context = context[max(1, len(context) * (len(ids) - self.max_prompt) // len(ids) // 2 + 1):]
                ids = tokenizer.tokenize(build_prompt(context, template, chat_tokenizer=chat))
            if len(ids) > self.max_prompt:
                raise ConfigError([f"the prompt template alone has {len(ids)} tokens, more than --seq-length "
                                   f"{self.cfg.model.seq_length} minus --rpt-max-response-length "
                                   f"{self.cfg.rpt.rpt_max_response_length}"])
            self.truncated += context != task.prompt_content
            self.prompt_cache[task.id] = ids
        return self.prompt_cache[task.id]

    def sampling(self, seed: int) -> SamplingConfig:
        r = self.cfg.rpt
        return SamplingConfig(max_new_tokens=r.rpt_max_response_length, temperature=r.rpt_temperature,
                              top_p=r.rpt_top_p, top_k=r.rpt_top_k, seed=seed)

    def evaluate(self, iteration: int) -> None:
        cfg, t = self.cfg, self.cfg.training
        t0 = time.perf_counter()
        # Held-out tasks are split over DP ranks; every rank of a model-parallel group evaluates the same ones.
        mine = self.eval_tasks[self.dp_rank::self.dp]
        if self.rlp is not None:     # RLP
            metrics = self.rlp.evaluate(self, mine, _seed(t.seed, iteration, self.dp_rank, 7))
        else:
            metrics = evaluate_tasks(self.engine, mine, self.prompt_ids, spec=self.reward,
                                     k=cfg.rpt.rpt_eval_samples,
                                     sampling=self.sampling(_seed(t.seed, iteration, self.dp_rank, 7)),
                                     reduce=lambda v: _sum_over_dp(v, self.device), standard=self.corpus,
                                     max_context_tokens=cfg.model.seq_length - 1, splits=self.eval_splits)
        self.result.evaluations[iteration] = metrics
        if cfg.checkpoint.save and self.job.env.rank == 0:
            # Next to the checkpoints, so before/after comparisons survive the job's log; rewritten
            # under a temporary name and renamed, so a crash never leaves a torn line.
            os.makedirs(cfg.checkpoint.save, exist_ok=True)
            path = os.path.join(cfg.checkpoint.save, "rpt_eval.jsonl")
            lines = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
            with atomic_open(path) as f:
                f.write(lines + json.dumps({"iteration": iteration, **metrics}) + "\n")
        dist.print_rank_0(f"> evaluation at iteration {iteration} ({time.perf_counter() - t0:.1f} s): " +
                          " | ".join(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}"
                                     for k, v in metrics.items()))
        self.driver.scalars("eval", metrics, iteration)

    def _schedule(self, model, forward_step, batches: list, length: int, forward_only: bool) -> list:
        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=model,
            num_microbatches=len(batches), seq_length=length, micro_batch_size=self.cfg.training.micro_batch_size,
            forward_only=forward_only)

    def _mini_batches(self, parts: list) -> list:
        """Each part's sequences -> (micro-batches, full length); in lockstep every rank gets the same
        counts and lengths (one MAX all-reduce over the world). Under context parallelism each
        micro-batch is cut to this rank's sequence chunks once, here, so that the log-probs the
        forward-only passes stash are in the layout of the update (the schedule takes the full length)."""
        cfg, t = self.cfg, self.cfg.training
        make = partial(_micro_batches, micro_batch_size=t.micro_batch_size,
                       length_multiple=sequence_length_multiple(cfg), max_length=cfg.model.seq_length,
                       attention_mask=not self.job.platform.transformer_engine)
        plan = [make(seqs) for seqs in parts]
        if self.lockstep:
            agreed = dist.max_over_ranks([len(b) for b, _ in plan] + [length for _, length in plan], self.device)
            plan = [make(seqs, length=agreed[len(parts) + i], count=agreed[i]) for i, seqs in enumerate(parts)]
        return [([split_for_this_cp_rank(b) for b in batches], length) for batches, length in plan]

    def _update(self, parts: list) -> tuple[dict, list]:
        """The GRPO update of one rollout batch split in `parts` (see the module docstring, 5-6):
        the summed reports and the grad norms of the optimizer steps taken."""
        r, t = self.cfg.rpt, self.cfg.training
        plan = self._mini_batches(parts)
        with torch.no_grad():
            for batches, length in plan:
                if not r.rpt_use_rollout_logprobs:
                    self._schedule(self.state.model, LogProbForwardStep(self.device, self.job.vocab_size,
                                                                       r.rpt_temperature, "old_log_probs"),
                                   batches, length, forward_only=True)
                if self.reference is not None:
                    self._schedule(self.reference, LogProbForwardStep(self.device, self.job.vocab_size,
                                                                     r.rpt_temperature, "ref_log_probs"),
                                   batches, length, forward_only=True)
        sums, peak, grad_norms, zeros = dict.fromkeys(_SUMS, 0.0), 0.0, [], []
        for i, (batches, length) in enumerate(plan):
            for chunk in self.state.model:
                chunk.zero_grad_buffer()
            self.state.optimizer.zero_grad()
            part_sums, part_peak = _reduce_report(self._schedule(self.state.model, self.policy_step, batches, length,
                                                                 forward_only=False), self.device)
            release_unused_memory(t.empty_unused_memory_level, 1)
            sums = {k: sums[k] + part_sums[k] for k in _SUMS}
            peak = max(peak, part_peak)
            if part_sums["tokens"] == 0:
                continue      # every group of this part was dropped, on every rank (the count is global)
            if not grads_are_finite(self.state.model, self.device):
                dist.print_rank_0(f"> iteration {self.driver.iteration + 1}, mini-batch {i + 1}: NaN/inf gradients; "
                                  "update skipped")
                continue
            updated, grad_norm, num_zeros = optimizer_step(self.state)
            if updated:
                self.state.scheduler.step(increment=t.global_batch_size // len(parts))
                grad_norms.append(float(grad_norm))
                if self.rlp is not None:    # RLP: phi <- tau phi + (1 - tau) theta after each update
                    self.rlp.ema.update(self.state.model)
                if num_zeros is not None:
                    zeros.append(float(num_zeros))
            release_unused_memory(t.empty_unused_memory_level, 2)
        # --log-num-zeros-in-grad: the mean over the updates taken, like the grad norm
        return ({**_summarise(sums, peak), "updates": len(grad_norms),
                 "num_zeros": sum(zeros) / len(zeros) if zeros else None}, grad_norms)

    def _rewards(self, batch_tasks: list, rollouts: list) -> torch.Tensor:
        """[contexts, G] rewards of the rollouts of `batch_tasks` under --rl-reward."""
        score = self.reward.score
        rewards = torch.tensor([[score(o.text, task) for o in group] for task, group in zip(batch_tasks, rollouts)],
                               dtype=torch.float32)
        if self.reward_group is not None:
            group, src = self.reward_group
            rewards = rewards.to(self.device)
            torch.distributed.broadcast(rewards, src, group=group)
            rewards = rewards.cpu()
        return rewards

    def batch_tasks(self) -> list:
        """This DP rank's tasks of the next iteration (see the module docstring, 1)."""
        first = self.driver.consumed_train + self.dp_rank * self.local_contexts
        return [self.tasks[self.sampler(first + i)] for i in range(self.local_contexts)]

    def rollouts(self, prompts: list, iteration: int) -> list:
        """G rollouts per prompt from the policy of this iteration (see the module docstring, 2)."""
        r = self.cfg.rpt
        if self.engine.name != "megatron" and not r.rollout_frozen_policy:
            # An external server samples from the trainer's weights of this iteration: model only,
            # written and exported by the engine (which skips an iteration it already serves).
            self.engine.sync_weights(iteration - 1)
        return self.engine.generate(prompts, r.rpt_group_size,
                                    self.sampling(_seed(self.cfg.training.seed, iteration - 1, self.dp_rank)))

    def kept_groups(self, rewards: torch.Tensor, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(informative, kept) groups: dynamic sampling from --rpt-dynamic-sampling-start on."""
        start = self.cfg.rpt.rpt_dynamic_sampling_start
        informative = informative_groups(rewards)
        return informative, informative if start is not None and iteration - 1 >= start else torch.ones_like(informative)

    def train(self, parts: list) -> tuple[dict, list, float]:
        """`_update` of the rollout batch, timed (seconds); its contexts are consumed."""
        t0 = time.perf_counter()
        report, grad_norms = self._update(parts)
        self.driver.consumed_train += self.cfg.rpt.rpt_contexts_per_step
        return report, grad_norms, time.perf_counter() - t0

    def update_metrics(self, report: dict, grad_norms: list, *, t_rollout: float, t_train: float,
                       rollout_tokens: float, train_tokens: float, truncated: int) -> dict:
        """The metrics every reward's iteration ends with: the update's `report`, whether it updated and
        its mean grad norm, the lr, rollout and train throughput and times, prompts truncated so far."""
        return {**report, "updated": bool(grad_norms),
                "grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else None,
                "lr": float(self.state.optimizer.param_groups[0]["lr"]),
                "rollout_tokens_per_s": rollout_tokens / max(t_rollout, 1e-9),
                "train_tokens_per_s": train_tokens / max(t_train, 1e-9),
                "time_rollout_s": t_rollout, "time_train_s": t_train,
                "prompts_truncated": truncated}   # so far, on this rank (contexts cut to fit --seq-length)

    def step(self, iteration: int) -> None:
        r = self.cfg.rpt
        if self.rlp is not None:     # RLP: its own rollouts, rewards and metrics, the same update and logging
            return self._finish_step(iteration, self.rlp.step(self, iteration))
        t_start = time.perf_counter()
        batch_tasks = self.batch_tasks()
        prompts = [self.prompt_ids(task) for task in batch_tasks]
        rollouts = self.rollouts(prompts, iteration)
        t_rollout = time.perf_counter() - t_start
        rewards = self._rewards(batch_tasks, rollouts)
        advantages = group_advantages(rewards)
        informative, keep = self.kept_groups(rewards, iteration)
        per_part = self.local_contexts // r.rpt_mini_batches
        parts = [[TrainSequence(tokens=list(prompts[g]) + o.tokens, prompt_len=len(prompts[g]),
                                rollout_log_probs=o.log_probs, advantage=float(advantages[g, j]))
                  for g in range(p * per_part, (p + 1) * per_part) if keep[g]
                  for j, o in enumerate(rollouts[g])]
                 for p in range(r.rpt_mini_batches)]
        resp_lens = [len(o.tokens) for group in rollouts for o in group]
        predict = self.reward.prediction        # an empty \boxed{} is no answer
        answered = sum(bool(predict(o.text)) for g in rollouts for o in g) if predict else 0
        local = [rewards.sum().item(), rewards.numel(), float(rewards.max(dim=1).values.sum()), len(rewards),
                 float(keep.sum()), float(sum(resp_lens)), float(sum(o.finished for g in rollouts for o in g)),
                 float(sum(len(p) for p in prompts) * r.rpt_group_size), float(informative.sum()),
                 float(sum(n * n for n in resp_lens)), float(answered)]
        (reward_sum, n_rollouts, groups_solved, n_groups, kept, resp_tokens, finished, prompt_tokens,
         n_informative, resp_tokens_sq, n_answered) = _sum_over_dp(local, self.device)
        mean_len = resp_tokens / max(n_rollouts, 1)

        report, grad_norms, t_train = self.train(parts)
        metrics = {
            "reward": reward_sum / max(n_rollouts, 1), f"pass@{r.rpt_group_size}": groups_solved / max(n_groups, 1),
            "kept_group_fraction": kept / max(n_groups, 1),
            "informative_group_fraction": n_informative / max(n_groups, 1),
            "response_length": mean_len, "finished_fraction": finished / max(n_rollouts, 1),
            # population std over the step's responses; answer_rate: responses with an extractable answer
            "response_length_std": math.sqrt(max(resp_tokens_sq / max(n_rollouts, 1) - mean_len ** 2, 0.0)),
            "answer_rate": n_answered / max(n_rollouts, 1),
            **self.update_metrics(report, grad_norms, t_rollout=t_rollout, t_train=t_train, rollout_tokens=resp_tokens,
                                  train_tokens=prompt_tokens * kept / max(n_groups, 1) + report["train_tokens"],
                                  truncated=self.truncated),
        }
        self._finish_step(iteration, metrics)

    def _finish_step(self, iteration: int, metrics: dict) -> None:
        if self.cfg.logging.log_params_norm and self._logged(iteration):   # collective, same steps everywhere
            metrics["params_norm"] = params_l2_norm(self.state.model, bf16=self.cfg.training.bf16, device=self.device)
        self.result.metrics[iteration] = metrics
        self._log(iteration, metrics)
        if not math.isfinite(metrics["policy_loss"]):
            raise FloatingPointError(f"iteration {iteration}: policy loss is {metrics['policy_loss']}")

    def _printed(self, iteration: int) -> bool:
        return iteration % self.cfg.logging.log_interval == 0 or iteration == self.cfg.training.train_iters

    def _logged(self, iteration: int) -> bool:
        """Printed or written to the sinks (configuration only: the same on every rank)."""
        return self._printed(iteration) or (writes_scalars(self.cfg)
                                            and iteration % self.cfg.logging.tensorboard_log_interval == 0)

    def _log(self, iteration: int, metrics: dict) -> None:
        r, t, g = self.cfg.rpt, self.cfg.training, metrics["grad_norm"]
        if iteration % self.cfg.logging.tensorboard_log_interval == 0:
            self.driver.scalars("rpt", metrics, iteration)
        if self._printed(iteration):
            extra = "".join(f"{label}: {metrics[key]:{fmt}} | " for key, label, fmt in (
                ("num_zeros", "num zeros", ".1f"), ("params_norm", "params norm", ".3f")) if metrics.get(key) is not None)
            dist.print_rank_0(
                f" iteration {iteration:8d}/{t.train_iters:8d} | consumed contexts: {self.driver.consumed_train} | "
                + (self.rlp.log_fields(metrics) if self.rlp is not None else   # RLP
                   f"reward: {metrics['reward']:.4f} | pass@{r.rpt_group_size}: {metrics[f'pass@{r.rpt_group_size}']:.4f} | "
                   f"kept groups: {metrics['kept_group_fraction']:.3f} | "
                   f"response length: {metrics['response_length']:.1f} (std {metrics['response_length_std']:.1f}) | "
                   f"answer rate: {metrics['answer_rate']:.3f} | ")
                + f"policy loss: {metrics['policy_loss']:.5f} | entropy: {metrics['entropy']:.4f} | "
                f"clip frac: {metrics['clip_fraction']:.4f} | ratio: {metrics['ratio']:.5f} | "
                f"|logp-engine| max: {metrics['max_abs_logp_diff']:.2e} | mismatch kl: {metrics['mismatch_kl']:.2e} | "
                + (f"tis weight: {metrics['tis_weight']:.4f} | " if r.rpt_tis_cap is not None else "")
                + f"lr: {metrics['lr']:.3e} | grad norm: {'-' if g is None else f'{g:.4f}'} | " + extra
                + f"updates: {metrics['updates']} | "
                f"rollout: {metrics['time_rollout_s']:.1f} s ({metrics['rollout_tokens_per_s']:.1f} tok/s) | "
                f"train: {metrics['time_train_s']:.1f} s ({metrics['train_tokens_per_s']:.1f} tok/s)")
            # Megatron-Core's timers of the interval (collective: every rank prints at the same iterations)
            block = self.timers.report(iteration, iteration - self.last_printed, self.driver.writer)
            self.last_printed = iteration
            if block:
                dist.print_rank_0(block)


def rpt_train(cfg: RunConfig) -> RPTResult:
    """Run (or resume) RPT as configured on the current launcher's ranks."""
    start_time = time.time()
    signals = SignalFlag(cfg.training.exit_signal_handler)
    # A task file of the wrong kind for --rl-reward stops the run before the model is built.
    reward = get_reward(cfg.rpt.rl_reward)
    for flag, path in (("--rpt-data", cfg.rpt.rpt_data), ("--rpt-eval-data", cfg.rpt.rpt_eval_data)):
        if path and os.path.isfile(path):
            check_task_file(reward, path, flag)
    job = setup_job(cfg, validate=validate_rpt_config, check_data=False)
    driver = TrainingDriver(cfg, job.state, job.device, start_time=start_time, signals=signals, name="RPT")
    driver.resume(counted="contexts")
    result = RPTResult(iteration=driver.iteration, start_iteration=driver.iteration, resumed_from=driver.resumed_from)
    rpt = _RPTJob(cfg, job, driver, result)
    r = cfg.rpt
    dist.print_rank_0(f"> RPT ({r.rl_reward}): {len(rpt.tasks)} tasks, {r.rpt_contexts_per_step} contexts x "
                      f"G={r.rpt_group_size} per "
                      f"step, engine {rpt.engine.name}, temperature {r.rpt_temperature}, max response "
                      f"{r.rpt_max_response_length} tokens, old policy "
                      f"{'from the engine' if r.rpt_use_rollout_logprobs else 'recomputed'}"
                      + (f", TIS cap {r.rpt_tis_cap}" if r.rpt_tis_cap is not None else "")
                      + (f", {r.rpt_mini_batches} mini-batches" if r.rpt_mini_batches > 1 else ""))
    try:
        result.iteration = driver.run(rpt.step, evaluate=rpt.evaluate if rpt.eval_tasks is not None else None,
                                      eval_at_start=True, eval_at_end=True)
    finally:
        result.saved, result.exit_reason = driver.saved, driver.exit_reason
        rpt.close()
        driver.close()
    return result
