"""`mrpt-pretrain` / `python -m megatron_rpt.pretrain`: parse Megatron-LM flags and run pretraining.

Launch with `torchrun --nproc-per-node N -m megatron_rpt.pretrain ...` or `srun -n N mrpt-pretrain ...`.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence

from megatron_rpt.config import ConfigError, parse_args


def run_job(job: Callable, cfg, errors: tuple = ()) -> int:
    """Run `job(cfg)` as an entry point: configuration, checkpoint, megatron-core version and `errors`
    exceptions are one `error: ...` line and exit code 2 (no traceback); the process group is always
    torn down."""
    from megatron_rpt.checkpoint.layout import CheckpointError
    from megatron_rpt.platform.compat.registry import MegatronCoreVersionError
    try:
        job(cfg)
    except (ConfigError, CheckpointError, MegatronCoreVersionError, *errors) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        from megatron_rpt.distributed import destroy_distributed
        destroy_distributed()
    return 0


def parse_or_exit(parse: Callable, argv: Optional[Sequence[str]]):
    """The parsed command line, or None after printing every flag problem as one error."""
    try:
        return parse(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg = parse_or_exit(parse_args, argv)
    if cfg is None:
        return 2
    if cfg.training.dry_run:
        from megatron_rpt.training.dry_run import dry_run
        return run_job(dry_run, cfg)
    from megatron_rpt.training.loop import pretrain
    return run_job(pretrain, cfg)


if __name__ == "__main__":
    sys.exit(main())
