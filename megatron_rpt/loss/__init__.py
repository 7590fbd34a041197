"""Per-token loss functions of the pretraining step, chosen by name (`--loss-function`).

Every function has the signature of Megatron-Core's vocab-parallel cross-entropy:
``fn(vocab_parallel_logits [s, b, V/TP], target [s, b]) -> per-token loss [s, b]`` with autograd,
computed over the tensor-parallel group. The training step only ever calls `get_loss_function`,
so the generalized beta/lambda loss registers here and drops in without touching the loop.
"""

from __future__ import annotations

from typing import Callable

import torch
from megatron.core import tensor_parallel

from megatron_rpt.config.schema import RunConfig
from megatron_rpt.loss.generalized import STAT_NAMES, generalized_vocab_parallel_loss

__all__ = ["STAT_NAMES", "generalized_vocab_parallel_loss", "get_loss_function", "loss_names", "register_loss"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# factory(cfg) -> loss function; factories let a loss read its own hyperparameters from the config
_REGISTRY: dict[str, Callable[[RunConfig], LossFn]] = {}


def register_loss(name: str):
    def wrap(factory: Callable[[RunConfig], LossFn]):
        _REGISTRY[name] = factory
        return factory
    return wrap


def loss_names() -> list[str]:
    return sorted(_REGISTRY)


def get_loss_function(cfg: RunConfig) -> LossFn:
    name = cfg.loss.loss_function
    if name not in _REGISTRY:
        raise ValueError(f"--loss-function: unknown loss {name!r}; known: {', '.join(loss_names())}")
    return _REGISTRY[name](cfg)


@register_loss("cross_entropy")
def _cross_entropy(cfg: RunConfig) -> LossFn:
    def loss(vocab_parallel_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # fp32 math whatever the logits dtype, as Megatron-LM does for the LM loss.
        return tensor_parallel.vocab_parallel_cross_entropy(vocab_parallel_logits.float(), target)
    return loss
