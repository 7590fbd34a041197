"""A run's whole configuration check: the flags (`config.validation`), the loss settings (`loss`)
and the data flags and files (`data.validate`), reported together as one `ConfigError`.

It lives above those packages so that `config/` imports none of them: the flag schema and its
checks stay free of Megatron-Core, torch and the data code, while each package checks its own flags.
"""

from __future__ import annotations

from megatron_rpt.config.schema import RunConfig
from megatron_rpt.config.validation import ConfigError, check_config, check_rpt_config
from megatron_rpt.data.validate import check_data_config
from megatron_rpt.loss import check_loss_config


def validate_config(cfg: RunConfig, world_size: int, *, check_files: bool = True,
                    pretraining_data: bool = True) -> RunConfig:
    """Fill derived defaults and raise `ConfigError` listing every problem found.

    `check_files`: also check the data prefixes and tokenizer files on disk. `pretraining_data=False`
    (RPT, whose data are tasks): no --data-path blend is needed."""
    problems = check_config(cfg, world_size)
    problems += check_loss_config(cfg)
    problems += check_data_config(cfg, check_files, pretraining_data)
    if problems:
        raise ConfigError(problems)
    return cfg


def validate_rpt_config(cfg: RunConfig, world_size: int, *, check_files: bool = True) -> RunConfig:
    """`validate_config` for `mrpt-rpt`: the RPT/GRPO flags too, and the batch derived from them."""
    rpt = check_rpt_config(cfg, world_size, check_files=check_files)
    try:
        validate_config(cfg, world_size, check_files=check_files, pretraining_data=False)
    except ConfigError as e:
        rpt = e.problems + rpt
    if rpt:
        raise ConfigError(rpt)
    return cfg
