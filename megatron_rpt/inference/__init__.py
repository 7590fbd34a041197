"""Rollout engines behind one interface (`base.RolloutEngine`): the embedded Megatron-Core engine
on the training model's own weights (default) and an external OpenAI-compatible server."""

from megatron_rpt.inference.base import Rollout, RolloutEngine, RolloutError, SamplingConfig

__all__ = ["Rollout", "RolloutEngine", "RolloutError", "SamplingConfig"]
