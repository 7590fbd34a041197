"""Per-token loss functions of the pretraining step, chosen by name (`--loss-function`).

Every function has the signature of Megatron-Core's vocab-parallel cross-entropy:
``fn(vocab_parallel_logits [..., V/TP], target [...]) -> per-token loss [...]`` with autograd, any
leading layout (the training step passes the output layer's [s, b, V/TP] and [s, b] labels, as
Megatron-Core's `compute_language_model_loss` does after transposing the [b, s] labels),
computed over the tensor-parallel group, plus an optional ``stats`` dict that receives per-token
distribution metrics (`STAT_NAMES`) where the loss can compute them. The training step only ever
calls `get_loss_function`, so the generalized beta/lambda loss registers here and drops in without
touching the loop.

The training step runs the function as the model's per-token head (`models.gpt.token_head`) on the
output layer's logits, in the model's dtype, which the loss then owns, as Megatron-Core's
cross-entropy owns them: it may overwrite them (fp32 logits: with exp(z - m) in forward, then the
gradient), so nothing of size [s, b, V/TP] is copied.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Protocol

import torch

from megatron_rpt.config.schema import RunConfig
from megatron_rpt.loss.generalized import STAT_NAMES, generalized_vocab_parallel_loss

__all__ = ["STAT_NAMES", "check_loss_config", "generalized_vocab_parallel_loss", "get_loss_function", "loss_names",
           "register_loss"]

class LossFn(Protocol):
    def __call__(self, vocab_parallel_logits: torch.Tensor, target: torch.Tensor, *,
                 stats: Optional[dict] = None) -> torch.Tensor: ...


# factory(cfg, vocab_size) -> loss function; factories read their own hyperparameters from the config
# and learn the real (unpadded) vocabulary, whose padded entries a loss may need to exclude.
_REGISTRY: dict[str, Callable[[RunConfig, int], LossFn]] = {}


def register_loss(name: str):
    def wrap(factory: Callable[[RunConfig, int], LossFn]):
        _REGISTRY[name] = factory
        return factory
    return wrap


def loss_names() -> list[str]:
    return sorted(_REGISTRY)


def get_loss_function(cfg: RunConfig, vocab_size: int) -> LossFn:
    """The configured per-token loss; `vocab_size` is the tokenizer's (unpadded) vocabulary."""
    name = cfg.loss.loss_function
    if name not in _REGISTRY:
        raise ValueError(f"--loss-function: unknown loss {name!r}; known: {', '.join(loss_names())}")
    return _REGISTRY[name](cfg, vocab_size)


@register_loss("cross_entropy")
def _cross_entropy(cfg: RunConfig, vocab_size: int) -> LossFn:
    """Megatron-Core's own vocab-parallel cross-entropy (the baseline; no distribution stats)."""
    def loss(vocab_parallel_logits: torch.Tensor, target: torch.Tensor, *, stats: Optional[dict] = None):
        from megatron.core import tensor_parallel  # lazily: the platform layer comes first
        # what GPTModel.compute_language_model_loss calls (it upcasts bf16 logits to fp32 itself)
        return tensor_parallel.vocab_parallel_cross_entropy(vocab_parallel_logits, target)
    return loss


@register_loss("generalized")
def _generalized(cfg: RunConfig, vocab_size: int) -> LossFn:
    """The beta/lambda loss (cross-entropy at zero settings) with vocab-parallel distribution stats."""
    c = cfg.loss

    def loss(vocab_parallel_logits: torch.Tensor, target: torch.Tensor, *, stats: Optional[dict] = None):
        return generalized_vocab_parallel_loss(
            vocab_parallel_logits, target, beta=c.loss_beta, lambda_high=c.loss_lambda_high,
            lambda_low=c.loss_lambda_low, top_k=c.loss_topk, vocab_size=vocab_size, stats=stats,
            overwrite_logits=True)
    return loss


def check_loss_config(cfg: RunConfig) -> list[str]:
    """The loss flags of a run, one message per problem (the registry is the list of valid names)."""
    lc, out = cfg.loss, []
    if lc.loss_function not in loss_names():
        out.append(f"--loss-function {lc.loss_function!r} is unknown; known: {', '.join(loss_names())}")
    for flag, value in (("--loss-beta", lc.loss_beta), ("--loss-lambda-high", lc.loss_lambda_high),
                        ("--loss-lambda-low", lc.loss_lambda_low)):
        if not math.isfinite(value):
            out.append(f"{flag} must be a finite number (got {value})")
    if lc.loss_beta < -1:
        out.append(f"--loss-beta {lc.loss_beta} < -1: the target weight pi(x)**(1-(1-pi(x))**beta) "
                   "is unbounded as pi(x) -> 1; use a value >= -1 (the paper uses -0.25 and 0.5)")
    if lc.loss_topk < 1:
        out.append(f"--loss-topk must be >= 1 (got {lc.loss_topk})")
    settings = (lc.loss_beta, lc.loss_lambda_high, lc.loss_lambda_low)
    if lc.loss_function == "cross_entropy" and any(settings):
        out.append("--loss-beta/--loss-lambda-high/--loss-lambda-low need --loss-function generalized "
                   "(the default); --loss-function cross_entropy is Megatron-Core's plain loss")
    return out
