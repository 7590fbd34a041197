"""GRPO math of the RPT update: group advantages, dynamic sampling, the clipped policy loss, log-probs.

- Advantages (DeepSeekMath's GRPO, outcome supervision): per group of G rollouts of one context,
  A_i = (r_i - mean(r)) / (std(r) + eps), std with Bessel's correction (as torch.std, verl), eps 1e-6;
  every token of a response gets its response's advantage.
- Dynamic sampling (DAPO): a group whose rewards are all equal has A = 0 for every token, so it
  carries no gradient but still dilutes the token mean; `informative_groups` finds the others.
- Policy loss per token (PPO clip with DAPO's separate lower/upper clip):
  -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A), rho = exp(logp - logp_old), plus
  beta * KL_k3(pi_ref || pi) = exp(ref - logp) - (ref - logp) - 1 when a reference is given. The
  token-level mean over the global batch is taken by Megatron-Core's schedule
  (`calculate_per_token_loss`: sum of masked token losses / all tokens of all DP ranks).
- `policy_log_probs`: log pi_T(label) = log softmax(z / T)[label], T the rollouts' sampling temperature
  (the policy that sampled them; the paper samples at T = 0.8; top-p/top-k truncation is not part of
  it, as verl), from vocab-parallel logits [..., V/TP] without gathering the vocabulary: the
  generalized loss at zero settings is Megatron-Core's cross-entropy, bit for bit, so logp = -CE of
  z / T; it communicates what that loss does (all-reduce MAX of the row maxima, one SUM of the packed
  row sums; with `stats`, one all-gather of the top-k plan), keeps only per-token values, and writes
  its gradient into the logits' storage in backward with no communication. z / T is taken in fp32 at
  least: handed-over fp32 logits are divided in place, bf16 logits at T != 1 cost one fp32 copy.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

ADVANTAGE_EPS = 1e-6


def group_advantages(rewards: torch.Tensor, eps: float = ADVANTAGE_EPS) -> torch.Tensor:
    """rewards [groups, G] -> advantages [groups, G] (see the module docstring)."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [groups, G>=2], got {tuple(rewards.shape)}")
    r = rewards.double()
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True)
    return ((r - mean) / (std + eps)).to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def informative_groups(rewards: torch.Tensor) -> torch.Tensor:
    """[groups] bool: groups whose rewards are not all equal (DAPO dynamic sampling keeps these)."""
    return (rewards != rewards[:, :1]).any(dim=1)


def policy_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                *, eps_low: float, eps_high: float, ref_log_probs: Optional[torch.Tensor] = None,
                kl_beta: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Per-token clipped surrogate loss (same shape as `log_probs`) and per-token diagnostics.

    `advantages` broadcasts against `log_probs` (e.g. [b, 1] for one advantage per response).
    Diagnostics (detached, per token): `ratio`, `clipped` (1 where the clipped term is the active
    minimum), `kl` (k3 to the reference, 0 without one), `approx_kl` (logp_old - logp, the PPO
    estimate of KL(old || new)).
    """
    log_ratio = log_probs - old_log_probs
    ratio = torch.exp(log_ratio)
    adv = advantages.to(log_probs.dtype)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(log_probs)
    if ref_log_probs is not None and kl_beta != 0.0:
        d = ref_log_probs - log_probs
        kl = torch.exp(d) - d - 1.0
        loss = loss + kl_beta * kl
    info = {"ratio": ratio.detach(), "clipped": (clipped < unclipped).detach().to(log_probs.dtype),
            "kl": kl.detach(), "approx_kl": (-log_ratio).detach()}
    return loss, info


class _DivideInPlace(torch.autograd.Function):
    """z / T written over z's own storage (the caller owns the logits), and the gradient divided by T
    in place in backward: no [N, V] temporary either way."""

    @staticmethod
    def forward(ctx, logits, temperature: float):
        ctx.temperature = temperature
        ctx.mark_dirty(logits)
        return logits.div_(temperature)

    @staticmethod
    def backward(ctx, grad):
        return grad.div_(ctx.temperature), None


def tempered_logits(logits: torch.Tensor, temperature: float, *, owned: bool) -> torch.Tensor:
    """z / T in the precision of the log-prob math (fp32 at least), as the engines scale before sampling.

    Owned fp32/float64 logits are divided in place; bf16/fp16 logits (or logits the caller keeps) go to a new
    fp32 tensor first, one [N, V/TP] fp32 temporary, because dividing in bf16 would round z / T once more than
    the sampler did. T == 1 returns the logits themselves."""
    if temperature <= 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if temperature == 1.0:
        return logits
    if owned and logits.dtype in (torch.float32, torch.float64):
        return _DivideInPlace.apply(logits, float(temperature))
    return logits.float() / temperature


def policy_log_probs(vocab_parallel_logits: torch.Tensor, labels: torch.Tensor, *, vocab_size: int,
                     temperature: float = 1.0, stats: Optional[dict] = None,
                     overwrite_logits: bool = False) -> torch.Tensor:
    """log softmax(z / T)[labels] [...] from vocab-parallel logits z [..., V/TP], any leading layout (the
    training step passes the output layer's [s, b, V/TP] as the model's per-token head; see the module
    docstring), with its gradient; T is the sampling temperature of the rollouts (the policy that sampled
    them is softmax(z / T)). `stats` (optional dict) receives per-token `entropy` of the tempered
    distribution and the rest of the loss's statistics. Labels < 0 give 0. `overwrite_logits`: the caller
    hands the logits over (the model's head; see `generalized_vocab_parallel_loss`); owned fp32 logits are
    then divided by T in place."""
    from megatron_rpt.loss.generalized import generalized_vocab_parallel_loss

    scaled = tempered_logits(vocab_parallel_logits, temperature, owned=overwrite_logits)
    # a new fp32 tensor (bf16 logits at T != 1) is this function's own to overwrite
    owned = overwrite_logits or scaled is not vocab_parallel_logits
    ce = generalized_vocab_parallel_loss(scaled, labels, beta=0.0, lambda_high=0.0,
                                         lambda_low=0.0, top_k=1, vocab_size=vocab_size, stats=stats,
                                         overwrite_logits=owned)
    return -(ce if ce.dtype == torch.float64 else ce.float())
