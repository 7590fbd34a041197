"""`mrpt-rpt` / `python -m megatron_rpt.train_rpt`: Reinforcement Pre-Training with GRPO on Megatron-Core.

Launch like pretraining: `torchrun --nproc-per-node N -m megatron_rpt.train_rpt ...` or
`srun -n N mrpt-rpt ...`; every pretraining flag applies, plus the RPT/GRPO group (`--help`).
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from megatron_rpt.config import parse_rpt_args


def main(argv: Optional[Sequence[str]] = None) -> int:
    from megatron_rpt.pretrain import parse_or_exit, run_job
    cfg = parse_or_exit(parse_rpt_args, argv)
    if cfg is None:
        return 2
    from megatron_rpt.inference.base import RolloutError
    from megatron_rpt.rpt.loop import rpt_train
    from megatron_rpt.rpt.prompts import PromptError
    from megatron_rpt.rpt.tasks import TaskError
    if cfg.training.dry_run:
        from functools import partial

        from megatron_rpt.training.dry_run import dry_run
        from megatron_rpt.validate import validate_rpt_config
        return run_job(partial(dry_run, validate=validate_rpt_config), cfg)
    return run_job(rpt_train, cfg, (RolloutError, TaskError, PromptError))


if __name__ == "__main__":
    sys.exit(main())
