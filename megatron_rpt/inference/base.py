"""The rollout-engine interface of RPT: G sampled responses per prompt, with per-token log-probs.

Every engine (the embedded Megatron-Core engine on the trainer's own weights, an external
OpenAI-compatible server) implements `RolloutEngine`; the RPT loop only talks to this interface.

Log-prob convention: `Rollout.log_probs[i]` is log pi_T(token_i | prompt, tokens_<i) of the policy
that sampled it: log softmax(z / T) over the full (padded) vocabulary at the sampling temperature T;
top-p / top-k truncation is not part of it (as verl). The trainer computes the same quantity
vocab-parallel (`rpt.grpo.policy_log_probs`); by default it recomputes the old policy's log-probs
itself and uses the engine's only to measure (and optionally correct) the engine-trainer mismatch.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Optional, Sequence


class RolloutError(RuntimeError):
    """An engine could not produce rollouts (server unreachable, bad response, sequence too long)."""


@dataclass(frozen=True)
class SamplingConfig:
    """How responses are sampled (shared by every engine)."""

    max_new_tokens: int                 # response budget; a response that reaches it is cut (finished=False)
    temperature: float = 1.0
    top_p: float = 1.0                  # 1.0: off
    top_k: int = 0                      # 0: off
    seed: int = 0                       # per-call seed; same seed + same weights -> same samples (embedded engine)
    stop_at_eod: bool = True            # stop a response at the tokenizer's end-of-document token

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@dataclass
class Rollout:
    """One sampled response to one prompt."""

    tokens: list                        # generated token ids (the EOD token included when it ended the response)
    log_probs: list                     # one float per generated token (see the module docstring)
    text: str                           # detokenized response
    finished: bool                      # True: ended at EOD; False: cut at max_new_tokens
    extra: dict = field(default_factory=dict)


class RolloutEngine(abc.ABC):
    """Samples `n` responses for each prompt (token ids) with the current policy weights."""

    name: str = "engine"

    @abc.abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingConfig) -> list[list[Rollout]]:
        """`result[i][j]` is the j-th of `n` responses to `prompts[i]`.

        Collective for engines that run on the trainer's ranks: every rank of a model-parallel
        group calls it with the same prompts and receives the same rollouts."""

    def sync_weights(self, iteration: int, checkpoint_dir: Optional[str] = None) -> None:
        """Make the engine sample from the trainer's current weights (no-op when colocated on them)."""

    def close(self) -> None:
        """Release the engine's resources (KV caches, server connections)."""
