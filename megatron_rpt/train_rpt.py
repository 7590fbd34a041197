"""`mrpt-rpt` / `python -m megatron_rpt.train_rpt`: Reinforcement Pre-Training with GRPO on Megatron-Core.

Launch like pretraining: `torchrun --nproc-per-node N -m megatron_rpt.train_rpt ...` or
`srun -n N mrpt-rpt ...`; every pretraining flag applies, plus the RPT/GRPO group (`--help`).
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from megatron_rpt.config import ConfigError, parse_rpt_args


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg = parse_rpt_args(argv)
    from megatron_rpt.inference.base import RolloutError
    from megatron_rpt.rpt.loop import rpt_train
    from megatron_rpt.training.checkpointing import CheckpointError
    try:
        from megatron_rpt.rpt.tasks import TaskError
    except ImportError:  # pragma: no cover - tasks module always ships
        TaskError = ValueError
    try:
        rpt_train(cfg)
    except (ConfigError, CheckpointError, RolloutError, TaskError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        from megatron_rpt.distributed import destroy_distributed
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
