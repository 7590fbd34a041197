"""The RPT driver (`mrpt-rpt`): contexts -> rollouts -> prefix rewards -> GRPO update -> checkpoint.

One iteration (exactly on-policy, one update per batch, as the paper):
1. the next `--rpt-contexts-per-step` tasks of a seeded per-epoch permutation (the position is the
   checkpoint's consumed-samples count, so a resumed run continues with the same contexts); each
   data-parallel rank takes its contiguous share;
2. the rollout engine samples `--rpt-group-size` responses per context (the embedded engine is
   collective over the model-parallel group; its seed is a function of seed, iteration and DP rank,
   so a resumed run samples the same rollouts);
3. `rpt.reward.prefix_match_reward` scores each response against the target token bytes;
4. `rpt.grpo` turns rewards into group advantages; from `--rpt-dynamic-sampling-start` on, groups
   whose rewards are all equal are dropped;
5. prompt + response sequences go through Megatron-Core's forward-backward schedule (TP/PP/DP/EP):
   the policy's log-probs come vocab-parallel from the logits (`grpo.policy_log_probs`), the
   clipped surrogate is averaged over all response tokens of the global batch
   (`calculate_per_token_loss`), then the Megatron optimizer steps.
An iteration whose batch kept no token (every group dropped) skips the update on every rank.
Metrics go to stdout every `--log-interval` and to TensorBoard; evaluation (`rpt.evaluate`) runs on
held-out tasks every `--eval-interval` and at the end.
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import torch

from megatron_rpt.config.schema import RunConfig
from megatron_rpt.inference.base import RolloutEngine, SamplingConfig

# Per-micro-batch sums reduced over the batch (order of the packed report tensor).
_SUMS = ("loss", "tokens", "entropy", "ratio", "clipped", "kl", "approx_kl", "abs_logp_diff")


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

    tokens: list            # prompt + response ids
    prompt_len: int
    old_log_probs: list     # per response token (rollout engine)
    advantage: float


def _micro_batches(seqs: list, micro_batch_size: int, length_multiple: int, max_length: int,
                   attention_mask: bool) -> tuple[list, int]:
    """Right-padded micro-batches of one length L (Megatron's schedule needs one shape per step).
    Position j predicts tokens[j + 1]; only response tokens carry loss."""
    longest = max(len(s.tokens) - 1 for s in seqs) if seqs else 1
    length = min(max_length, -(-longest // length_multiple) * length_multiple)
    batches = []
    n_batches = max(1, -(-len(seqs) // micro_batch_size))
    for b in range(n_batches):
        chunk = seqs[b * micro_batch_size:(b + 1) * micro_batch_size]
        tokens = torch.zeros(micro_batch_size, length, dtype=torch.long)
        labels = torch.zeros(micro_batch_size, length, dtype=torch.long)
        mask = torch.zeros(micro_batch_size, length)
        old = torch.zeros(micro_batch_size, length)
        adv = torch.zeros(micro_batch_size, 1)
        for i, s in enumerate(chunk):
            ids = torch.tensor(s.tokens, dtype=torch.long)
            n = len(s.tokens) - 1
            tokens[i, :n] = ids[:-1]
            labels[i, :n] = ids[1:]
            start = s.prompt_len - 1             # the position whose label is the first response token
            mask[i, start:n] = 1.0
            old[i, start:n] = torch.tensor(s.old_log_probs, dtype=torch.float32)
            adv[i, 0] = s.advantage
        batch = {"tokens": tokens, "labels": labels, "loss_mask": mask, "old_log_probs": old, "advantages": adv,
                 "position_ids": torch.arange(length).unsqueeze(0).expand(micro_batch_size, length).contiguous()}
        if attention_mask:
            batch["attention_mask"] = torch.triu(torch.ones(1, 1, length, length, dtype=torch.bool), diagonal=1)
        batches.append(batch)
    return batches, length


class ReferenceForwardStep:
    """Forward-only step of the frozen reference policy: stores its log-probs of the labels in the
    host batch dict (key `ref_log_probs`, last pipeline stage only), for the policy step's KL term."""

    def __init__(self, device: torch.device, vocab_size: int):
        self.device, self.vocab_size = device, vocab_size

    def __call__(self, data_iterator, model):
        from megatron_rpt.models.gpt import token_head
        from megatron_rpt.rpt.grpo import policy_log_probs

        host = next(data_iterator)
        batch = {k: v.to(self.device) for k, v in host.items()}
        with token_head(model, partial(policy_log_probs, vocab_size=self.vocab_size, overwrite_logits=True)):
            output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])

        def stash(log_probs):
            host["ref_log_probs"] = log_probs.detach().cpu()
            zero = torch.zeros((), device=self.device)
            return zero, torch.zeros((), dtype=torch.int, device=self.device), {}
        return output, stash


class PolicyForwardStep:
    """Megatron forward_step_func for the GRPO update: policy log-probs (the model's per-token head)
    and the clipped surrogate (plus kl_beta x k3 KL to the reference where the batch carries
    `ref_log_probs`)."""

    def __init__(self, device: torch.device, vocab_size: int, eps_low: float, eps_high: float, kl_beta: float = 0.0):
        self.device, self.vocab_size = device, vocab_size
        self.eps_low, self.eps_high, self.kl_beta = eps_low, eps_high, kl_beta

    def _loss(self, batch: dict, stats: dict, logp: torch.Tensor):
        from megatron_rpt.rpt.grpo import policy_loss

        mask = batch["loss_mask"]
        keep = mask > 0
        old = batch["old_log_probs"]
        loss, info = policy_loss(logp, old, batch["advantages"], eps_low=self.eps_low, eps_high=self.eps_high,
                                 ref_log_probs=batch.get("ref_log_probs"), kl_beta=self.kl_beta)
        diff = torch.where(keep, (logp.detach() - old).abs(), 0.0)
        total = torch.sum(loss * mask)
        tokens = mask.sum()

        def s(x):
            return torch.where(keep, x.float(), 0.0).sum()

        report = torch.stack([total.detach(), tokens, s(stats["entropy"].t()), s(info["ratio"]), s(info["clipped"]),
                              s(info["kl"]), s(info["approx_kl"]), diff.sum()])
        max_diff = diff.max()
        return total, tokens.to(torch.int), {"rpt": report, "max_abs_logp_diff": max_diff}

    def __call__(self, data_iterator, model):
        from megatron_rpt.models.gpt import token_head
        from megatron_rpt.rpt.grpo import policy_log_probs

        batch = {k: v.to(self.device) for k, v in next(data_iterator).items()}
        stats: dict = {}    # per-token statistics [s, b] of the policy's distribution (entropy)
        with token_head(model, partial(policy_log_probs, vocab_size=self.vocab_size, stats=stats,
                                       overwrite_logits=True)):
            logp = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])
        return logp, partial(self._loss, batch, stats)


def _reduce_report(outputs: list, device: torch.device) -> dict:
    """Sum the packed micro-batch reports over micro-batches and DP ranks, max of |logp - old|; every
    pipeline stage receives the last stage's values."""
    from megatron_rpt.training.step import reduce_from_last_stage

    total = torch.zeros(len(_SUMS), dtype=torch.float64, device=device)
    peak = torch.zeros(1, dtype=torch.float64, device=device)
    for out in outputs:
        total += out["rpt"].to(torch.float64)
        peak = torch.maximum(peak, out["max_abs_logp_diff"].to(torch.float64).view(1))
    reduce_from_last_stage(total)
    reduce_from_last_stage(peak, op=torch.distributed.ReduceOp.MAX)   # |differences| >= 0
    values = dict(zip(_SUMS, total.tolist()))
    n = max(values["tokens"], 1.0)
    return {"policy_loss": values["loss"] / n, "train_tokens": int(values["tokens"]),
            "entropy": values["entropy"] / n, "ratio": values["ratio"] / n, "clip_fraction": values["clipped"] / n,
            "kl": values["kl"] / n, "approx_kl": values["approx_kl"] / n,
            "mean_abs_logp_diff": values["abs_logp_diff"] / n, "max_abs_logp_diff": float(peak.item())}


def _sum_over_dp(values: list, device: torch.device) -> list:
    """Element-wise sum over data-parallel ranks (model-parallel ranks hold the same values)."""
    from megatron.core import parallel_state as ps

    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, group=ps.get_data_parallel_group(with_context_parallel=True))
    return t.tolist()


def build_engine(cfg: RunConfig, job) -> RolloutEngine:
    r = cfg.rpt
    if r.rollout_engine == "megatron":
        from megatron_rpt.inference.megatron_engine import MegatronEngine
        from megatron_rpt.config.validation import fp8_row_multiple
        # FP8 GEMMs need aligned row counts and a decode step has one row per sequence: batches are padded.
        return MegatronEngine(job.state.model, job.tokenizer, padded_vocab_size=job.vocab_size,
                              max_batch_size=r.rollout_max_batch_size, max_sequence_length=cfg.model.seq_length,
                              row_multiple=fp8_row_multiple(cfg) if cfg.fp8.fp8_format else 1)
    import os

    from megatron_rpt.inference.external import OpenAICompatibleEngine
    return OpenAICompatibleEngine(
        r.rollout_url, eod_token_id=job.tokenizer.eod, reload=r.rollout_reload,
        reload_endpoint=r.rollout_reload_endpoint, restart_command=r.rollout_restart_command,
        sync_dir=r.rollout_sync_dir or os.path.join(cfg.checkpoint.save, "rollout_sync"))


def build_reference(cfg: RunConfig, job) -> list:
    """The frozen reference policy of the KL term: this rank's model chunks (same layout, no DDP,
    no gradients) with the weights of --rpt-ref-load's latest checkpoint."""
    import types

    from megatron.core.transformer.module import Float16Module

    from megatron_rpt.models.gpt import build_model_chunks, transformer_config
    from megatron_rpt.training.checkpointing import CheckpointError, load_checkpoint

    config = transformer_config(cfg, job.platform)
    chunks = build_model_chunks(cfg, job.platform, job.vocab_size, job.device, config)
    if cfg.training.bf16 or cfg.training.fp16:
        chunks = [Float16Module(config, c) for c in chunks]
    for chunk in chunks:
        chunk.requires_grad_(False)
        chunk.eval()
    if load_checkpoint(cfg.rpt.rpt_ref_load, types.SimpleNamespace(model=chunks, optimizer=None), cfg) is None:
        raise CheckpointError(f"--rpt-ref-load: no checkpoint in {cfg.rpt.rpt_ref_load}")
    return chunks


def rpt_train(cfg: RunConfig) -> RPTResult:
    """Run (or resume) RPT as configured on the current launcher's ranks."""
    from megatron_rpt.training.loop import ExitWatch, _SignalFlag  # the pretraining loop's exit logic

    start_time = time.time()
    signals = _SignalFlag(cfg.training.exit_signal_handler)
    from megatron_rpt.config.validation import validate_rpt_config
    from megatron_rpt.training.setup import setup_job

    job = setup_job(cfg, validate=validate_rpt_config, check_data=False)
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_rpt import distributed as dist
    from megatron_rpt.config import ConfigError
    from megatron_rpt.config.validation import sequence_length_multiple
    from megatron_rpt.rpt.evaluate import evaluate_tasks
    from megatron_rpt.rpt.grpo import group_advantages, informative_groups
    from megatron_rpt.rpt.prompts import build_prompt, load_template
    from megatron_rpt.rpt.reward import prefix_match_reward
    from megatron_rpt.rpt.tasks import load_tasks
    from megatron_rpt.training.checkpointing import load_checkpoint, save_checkpoint
    from megatron_rpt.training.step import grads_are_finite

    r, t, m = cfg.rpt, cfg.training, cfg.model
    device, tokenizer, state = job.device, job.tokenizer, job.state
    tasks = load_tasks(r.rpt_data)
    eval_tasks = load_tasks(r.rpt_eval_data) if r.rpt_eval_data else None
    if eval_tasks is not None and r.rpt_eval_max_tasks:
        eval_tasks = eval_tasks[:r.rpt_eval_max_tasks]
    template = load_template(r.rpt_prompt_template)
    chat = getattr(tokenizer, "_tok", None) if r.rpt_chat_template else None
    if r.rpt_chat_template and chat is None:
        raise ConfigError(["--rpt-chat-template needs --tokenizer-type HuggingFaceTokenizer (a chat template)"])
    prompt_cache: dict = {}
    max_prompt = m.seq_length - r.rpt_max_response_length
    truncated = [0]

    def prompt_ids(task) -> list:
        """The task's prompt ids; a context too long for --seq-length minus the response budget loses
        its oldest text (the paper caps prompts at 4,096 tokens), never its end."""
        if task.id not in prompt_cache:
            context = task.context
            ids = tokenizer.tokenize(build_prompt(context, template, chat_tokenizer=chat))
            while len(ids) > max_prompt and context:
                context = context[max(1, len(context) * (len(ids) - max_prompt) // len(ids) // 2 + 1):]
                ids = tokenizer.tokenize(build_prompt(context, template, chat_tokenizer=chat))
            if len(ids) > max_prompt:
                raise ConfigError([f"the prompt template alone has {len(ids)} tokens, more than --seq-length "
                                   f"{m.seq_length} minus --rpt-max-response-length {r.rpt_max_response_length}"])
            truncated[0] += context != task.context
            prompt_cache[task.id] = ids
        return prompt_cache[task.id]

    result = RPTResult(iteration=0, start_iteration=0)
    consumed = 0
    if cfg.checkpoint.load:
        loaded = load_checkpoint(cfg.checkpoint.load, state, cfg, iteration=cfg.checkpoint.ckpt_step)
        if loaded is not None:
            result.iteration = result.start_iteration = loaded.iteration
            consumed = loaded.consumed_train_samples
            result.resumed_from = loaded.path
            dist.print_rank_0(f"> loaded {loaded.path} at iteration {loaded.iteration} (consumed contexts {consumed})")
        else:
            dist.print_rank_0(f"> no checkpoint in {cfg.checkpoint.load}; starting from the initial weights")
    engine = build_engine(cfg, job)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    local_contexts = r.rpt_contexts_per_step // dp
    sampler = ContextSampler(len(tasks), t.seed)
    forward_step = PolicyForwardStep(device, job.vocab_size, r.grpo_clamp_eps_lower, r.grpo_clamp_eps_upper,
                                     r.grpo_kl_beta)
    reference = None
    if r.grpo_kl_beta > 0:
        reference = build_reference(cfg, job)
        dist.print_rank_0(f"> KL reference policy: {r.rpt_ref_load} (beta {r.grpo_kl_beta})")
    writer = None
    if cfg.logging.tensorboard_dir and job.env.rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(log_dir=cfg.logging.tensorboard_dir, max_queue=100)
    dist.print_rank_0(f"> RPT: {len(tasks)} tasks, {r.rpt_contexts_per_step} contexts x G={r.rpt_group_size} per "
                      f"step, engine {engine.name}, temperature {r.rpt_temperature}, max response "
                      f"{r.rpt_max_response_length} tokens")

    def sampling(seed: int) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=r.rpt_max_response_length, temperature=r.rpt_temperature,
                              top_p=r.rpt_top_p, top_k=r.rpt_top_k, seed=seed)

    def run_eval(iteration: int) -> None:
        if eval_tasks is None:
            return
        t0 = time.perf_counter()
        # Held-out tasks are split over DP ranks; every rank of a model-parallel group evaluates the same ones.
        mine = eval_tasks[dp_rank::dp]
        metrics = evaluate_tasks(engine, mine, prompt_ids, k=r.rpt_eval_samples,
                                 sampling=sampling(_seed(t.seed, iteration, dp_rank, 7)),
                                 reduce=lambda v: _sum_over_dp(v, device), max_context_tokens=m.seq_length - 1)
        result.evaluations[iteration] = metrics
        if cfg.checkpoint.save and job.env.rank == 0:
            # Next to the checkpoints, so before/after comparisons survive the job's log; rewritten
            # under a temporary name and renamed, so a crash never leaves a torn line.
            import json
            import os
            os.makedirs(cfg.checkpoint.save, exist_ok=True)
            path = os.path.join(cfg.checkpoint.save, "rpt_eval.jsonl")
            lines = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                f.write(lines + json.dumps({"iteration": iteration, **metrics}) + "\n")
            os.replace(path + ".tmp", path)
        dist.print_rank_0(f"> evaluation at iteration {iteration} ({time.perf_counter() - t0:.1f} s): " +
                          " | ".join(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}"
                                     for k, v in metrics.items()))
        if writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    writer.add_scalar(f"eval/{k}", v, iteration)

    def save(iteration: int) -> None:
        if cfg.checkpoint.save:
            t0 = time.perf_counter()
            path = save_checkpoint(cfg.checkpoint.save, iteration, state, cfg, consumed_train_samples=consumed,
                                   consumed_valid_samples=0, fully_parallel=cfg.checkpoint.ckpt_fully_parallel_save)
            result.saved.append(path)
            dist.print_rank_0(f"> saved checkpoint {path} ({time.perf_counter() - t0:.1f} s)")

    iteration = result.iteration
    last_saved = iteration if result.resumed_from else None
    exit_watch = ExitWatch(t, start_time, signals, device)
    if t.eval_interval and iteration == 0:
        run_eval(0)
    try:
        while iteration < t.train_iters:
            t_start = time.perf_counter()
            first = consumed + dp_rank * local_contexts
            batch_tasks = [tasks[sampler(first + i)] for i in range(local_contexts)]
            prompts = [prompt_ids(task) for task in batch_tasks]
            if engine.name != "megatron":
                # An external server sees the trainer's weights through an export of this iteration's
                # checkpoint (the engine skips an iteration it already serves).
                if last_saved != iteration:
                    save(iteration)
                    last_saved = iteration
                engine.sync_weights(iteration, cfg.checkpoint.save)
            rollouts = engine.generate(prompts, r.rpt_group_size, sampling(_seed(t.seed, iteration, dp_rank)))
            t_rollout = time.perf_counter() - t_start
            rewards = torch.tensor([[prefix_match_reward(o.text, task.target_token_bytes) for o in group]
                                    for task, group in zip(batch_tasks, rollouts)], dtype=torch.float32)
            advantages = group_advantages(rewards)
            informative = informative_groups(rewards)
            dynamic = r.rpt_dynamic_sampling_start is not None and iteration >= r.rpt_dynamic_sampling_start
            keep = informative if dynamic else torch.ones_like(informative)
            seqs = [TrainSequence(tokens=list(p) + o.tokens, prompt_len=len(p), old_log_probs=o.log_probs,
                             advantage=float(advantages[g, j]))
                    for g, (p, group) in enumerate(zip(prompts, rollouts)) if keep[g]
                    for j, o in enumerate(group)]
            resp_lens = [len(o.tokens) for group in rollouts for o in group]
            local = [rewards.sum().item(), rewards.numel(), float(rewards.max(dim=1).values.sum()), len(rewards),
                     float(keep.sum()), float(sum(resp_lens)), float(sum(o.finished for g in rollouts for o in g)),
                     float(sum(len(p) for p in prompts) * r.rpt_group_size), float(informative.sum())]
            (reward_sum, n_rollouts, groups_solved, n_groups, kept, resp_tokens, finished, prompt_tokens,
             n_informative) = _sum_over_dp(local, device)

            t_train0 = time.perf_counter()
            # The length suits sequence parallelism and FP8 (models.gpt.sequence_length_multiple). DP ranks
            # may run different numbers of micro-batches: the token mean stays exact (Megatron sums over DP).
            batches, length = _micro_batches(seqs, t.micro_batch_size, sequence_length_multiple(cfg), m.seq_length,
                                             attention_mask=not job.platform.transformer_engine)
            if reference is not None:
                with torch.no_grad():
                    get_forward_backward_func()(
                        forward_step_func=ReferenceForwardStep(device, job.vocab_size), data_iterator=iter(batches),
                        model=reference, num_microbatches=len(batches), seq_length=length,
                        micro_batch_size=t.micro_batch_size, forward_only=True)
            for chunk in state.model:
                chunk.zero_grad_buffer()
            state.optimizer.zero_grad()
            outputs = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter(batches), model=state.model,
                num_microbatches=len(batches), seq_length=length, micro_batch_size=t.micro_batch_size,
                forward_only=False)
            report = _reduce_report(outputs, device)
            updated = False
            grad_norm = None
            if report["train_tokens"] > 0 and grads_are_finite(state.model, device):
                updated, grad_norm, _ = state.optimizer.step()
                if updated:
                    state.scheduler.step(increment=t.global_batch_size)
            elif report["train_tokens"] > 0:
                dist.print_rank_0(f"> iteration {iteration + 1}: NaN/inf gradients; update skipped")
            t_train = time.perf_counter() - t_train0
            iteration += 1
            consumed += r.rpt_contexts_per_step
            metrics = {
                "reward": reward_sum / max(n_rollouts, 1), f"pass@{r.rpt_group_size}": groups_solved / max(n_groups, 1),
                "kept_group_fraction": kept / max(n_groups, 1),
                "informative_group_fraction": n_informative / max(n_groups, 1),
                "response_length": resp_tokens / max(n_rollouts, 1), "finished_fraction": finished / max(n_rollouts, 1),
                **report, "updated": bool(updated), "grad_norm": None if grad_norm is None else float(grad_norm),
                "lr": float(state.optimizer.param_groups[0]["lr"]),
                "rollout_tokens_per_s": resp_tokens / max(t_rollout, 1e-9),
                "train_tokens_per_s": (prompt_tokens * kept / max(n_groups, 1) + report["train_tokens"]) / max(t_train, 1e-9),
                "time_rollout_s": t_rollout, "time_train_s": t_train,
                "prompts_truncated": truncated[0],   # so far, on this rank (contexts cut to fit --seq-length)
            }
            result.metrics[iteration] = metrics
            if writer is not None and iteration % cfg.logging.tensorboard_log_interval == 0:
                for k, v in metrics.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        writer.add_scalar(f"rpt/{k}", v, iteration)
            if iteration % cfg.logging.log_interval == 0 or iteration == t.train_iters:
                dist.print_rank_0(
                    f" iteration {iteration:8d}/{t.train_iters:8d} | consumed contexts: {consumed} | "
                    f"reward: {metrics['reward']:.4f} | pass@{r.rpt_group_size}: {metrics[f'pass@{r.rpt_group_size}']:.4f} | "
                    f"kept groups: {metrics['kept_group_fraction']:.3f} | response length: {metrics['response_length']:.1f} | "
                    f"policy loss: {report['policy_loss']:.5f} | entropy: {report['entropy']:.4f} | "
                    f"clip frac: {report['clip_fraction']:.4f} | ratio: {report['ratio']:.5f} | "
                    f"|logp-old| max: {report['max_abs_logp_diff']:.2e} | lr: {metrics['lr']:.3e} | "
                    f"grad norm: {'-' if grad_norm is None else f'{grad_norm:.4f}'} | "
                    f"rollout: {t_rollout:.1f} s ({metrics['rollout_tokens_per_s']:.1f} tok/s) | "
                    f"train: {t_train:.1f} s ({metrics['train_tokens_per_s']:.1f} tok/s)")
            if not math.isfinite(report["policy_loss"]):
                raise FloatingPointError(f"iteration {iteration}: policy loss is {report['policy_loss']}")
            if t.eval_interval and iteration % t.eval_interval == 0 and iteration != t.train_iters:
                run_eval(iteration)
            if cfg.checkpoint.save_interval and iteration % cfg.checkpoint.save_interval == 0:
                save(iteration)
                last_saved = iteration
            reason = exit_watch.reason(iteration)
            if reason is not None:
                result.exit_reason = reason
                break
        result.iteration = iteration
        if cfg.checkpoint.save and last_saved != iteration:
            save(iteration)
        if t.eval_interval and result.exit_reason == "train_iters":
            run_eval(iteration)
        dist.print_rank_0(f"> RPT stopped at iteration {iteration} ({result.exit_reason})")
    finally:
        engine.close()
        if writer is not None:
            writer.flush()
            writer.close()
    return result
