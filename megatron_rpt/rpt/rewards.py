"""The reward registry of `mrpt-rpt` (`--rl-reward NAME`): what each reward scores, which task files it
reads, its default prompt template and the answer cons@k votes on.

- `prefix_match` (RPT, arXiv 2506.08007; the default): the boxed next-token prediction is a prefix of
  the corpus continuation ending on a token boundary (`rpt.reward`); RPT task files
  (tools/build_rpt_data.py, `rpt.tasks.Task`); template "v0".
- `math_answer` (RLVR): the boxed final answer after `</think>` equals the problem's reference answer
  (`rpt.answers`: normalised string, exact number, or math-verify); problem files
  (tools/build_rl_data.py, `rpt.tasks.problems.Problem`); template "math".
- `information_gain` (RLP, arXiv 2510.01265): scored by the model itself from log-probs in the loop,
  so `score` is None; RPT task files (the raw text of their contexts); template "rlp".

`--rl-reward`'s choices are `config.schema.RL_REWARDS` (the config layer cannot import this one);
tests keep the two equal. `check_task_file` refuses, at start-up, a task file of the wrong kind.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

from megatron_rpt.config import ConfigError
from megatron_rpt.rpt.answers import canonical_answer, math_answer_reward
from megatron_rpt.rpt.reward import extract_prediction, prefix_match_reward
from megatron_rpt.rpt.tasks import TaskError, load_problems, load_tasks, task_file_kind

TASK_KINDS = {
    "corpus": ("RPT task files", "tools/build_rpt_data.py", load_tasks),
    "problem": ("RLVR problem files", "tools/build_rl_data.py", load_problems),
}


@dataclass(frozen=True)
class RewardSpec:
    name: str                 # the --rl-reward value
    task_kind: str            # "corpus": RPT task files (tools/build_rpt_data.py, rpt.tasks.Task)
                              # "problem": RLVR problem files (tools/build_rl_data.py, rpt.tasks.problems.Problem)
    default_template: str     # a name in rpt.prompts.TEMPLATES ("v0" for RPT)
    model_scored: bool        # True: the loop computes the reward from log-probs (RLP); score() is not called
    score: Optional[Callable[[str, object], float]]        # (response text, task) -> reward
    prediction: Optional[Callable[[str], Optional[str]]]   # response -> normalised answer that cons@k votes on


_REGISTRY: dict[str, RewardSpec] = {}


def register_reward(spec: RewardSpec) -> RewardSpec:
    """Add a reward; a name registered twice or an inconsistent spec is a ValueError."""
    if spec.name in _REGISTRY:
        raise ValueError(f"reward {spec.name!r} is already registered")
    if spec.task_kind not in TASK_KINDS:
        raise ValueError(f"reward {spec.name!r}: task_kind must be one of {sorted(TASK_KINDS)}")
    if spec.model_scored != (spec.score is None):
        raise ValueError(f"reward {spec.name!r}: a model-scored reward has no score(), any other needs one")
    _REGISTRY[spec.name] = spec
    return spec


def get_reward(name: str) -> RewardSpec:
    if name not in _REGISTRY:
        raise ConfigError([f"--rl-reward {name!r} is not a reward; choose one of {', '.join(reward_names())}"])
    return _REGISTRY[name]


def reward_names() -> list[str]:
    return sorted(_REGISTRY)


def check_task_file(spec: RewardSpec, path: str | os.PathLike, flag: str) -> None:
    """TaskError naming `flag` and the file when its first record is of the other kind than `spec` reads."""
    kind = task_file_kind(path)
    if kind is not None and kind != spec.task_kind:
        what, tool, _ = TASK_KINDS[kind]
        need, need_tool, _ = TASK_KINDS[spec.task_kind]
        raise TaskError(f"{flag} {path}: holds {what} ({tool}), but --rl-reward {spec.name} reads {need} "
                        f"({need_tool})")


def load_reward_tasks(spec: RewardSpec, path: str | os.PathLike, flag: str) -> list:
    """The tasks of `path` read as `spec` needs them (after `check_task_file`)."""
    check_task_file(spec, path, flag)
    return TASK_KINDS[spec.task_kind][2](path)


register_reward(RewardSpec(
    name="prefix_match", task_kind="corpus", default_template="v0", model_scored=False,
    score=lambda text, task: prefix_match_reward(text, task.target_token_bytes),
    prediction=extract_prediction))     # verbatim: a leading space is part of a predicted token
register_reward(RewardSpec(
    name="math_answer", task_kind="problem", default_template="math", model_scored=False,
    score=lambda text, task: math_answer_reward(text, task.answer),
    prediction=lambda text: canonical_answer(extract_prediction(text))))
register_reward(RewardSpec(
    name="information_gain", task_kind="corpus", default_template="rlp", model_scored=True, score=None,
    prediction=None))
