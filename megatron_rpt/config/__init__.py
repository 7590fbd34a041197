"""Run configuration: Megatron-LM flags -> typed dataclasses, presets and the flags' own checks
(a whole run is checked by `megatron_rpt.validate`)."""

from megatron_rpt.config.arguments import build_parser, parse_args, parse_rpt_args
from megatron_rpt.config.presets import PRESETS, get_preset, preset_names
from megatron_rpt.config.schema import (CheckpointConfig, DataConfig, LoggingConfig, LossConfig, ModelConfig,
                                        OptimizerConfig, ParallelConfig, RPTConfig, RunConfig, TrainingConfig)
from megatron_rpt.config.validation import ConfigError, data_parallel_size

__all__ = [
    "build_parser", "parse_args", "parse_rpt_args", "RPTConfig", "PRESETS", "get_preset", "preset_names", "RunConfig", "ModelConfig",
    "ParallelConfig", "OptimizerConfig", "TrainingConfig", "DataConfig", "CheckpointConfig",
    "LoggingConfig", "LossConfig", "ConfigError", "data_parallel_size",
]
