"""Command line -> `RunConfig`, with Megatron-LM flag names generated from the dataclass fields.

Only flags the user actually gives override preset values and defaults (argparse.SUPPRESS), so
`--model-preset tiny --num-layers 2` means "tiny, but two layers".
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Optional, Sequence

from megatron_rpt.config.presets import get_preset, preset_names
from megatron_rpt.config.schema import PRETRAIN_SECTIONS, SECTIONS, ModelConfig, RunConfig

_GROUP_TITLES = {
    "model": "network size", "parallel": "distributed", "optimizer": "optimizer and learning rate",
    "training": "training", "fp8": "FP8 (Transformer Engine, CUDA)", "data": "data and tokenizer", "checkpoint": "checkpointing",
    "logging": "logging", "loss": "loss", "profiling": "profiling", "rpt": "reinforcement pre-training (RPT) and GRPO",
}


def _scalar_type(tp) -> type:
    """The argparse `type` for a field annotation such as Optional[int]."""
    if isinstance(tp, str):  # postponed annotations
        tp = eval(tp, vars(typing))  # noqa: S307 - our own annotations only
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _scalar_type(args[0])
    return tp


def _dest(section: str, name: str) -> str:
    return f"{section}.{name}"


def build_parser(extra_args_provider=None, *, prog: str = "mrpt-pretrain",
                 description: str = "Megatron-Core pretraining (megatron-rpt).",
                 sections: Optional[dict] = None) -> argparse.ArgumentParser:
    """The parser of `prog` over config `sections` (default: pretraining's); `extra_args_provider(parser)`
    may add groups (as in Megatron-LM)."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     argument_default=argparse.SUPPRESS, allow_abbrev=False)
    parser.add_argument("--model-preset", dest="model_preset", choices=preset_names(),
                        help="Fill the model shape from a preset; explicit flags win.")
    for section, cls in (PRETRAIN_SECTIONS if sections is None else sections).items():
        group = parser.add_argument_group(_GROUP_TITLES[section])
        for f in dataclasses.fields(cls):
            meta = f.metadata
            flag = meta.get("flag") or "--" + f.name.replace("_", "-")
            dest = _dest(section, f.name)
            tp = _scalar_type(f.type)
            flags = (flag, *meta.get("aliases", ()))
            if tp is bool:
                group.add_argument(*flags, dest=dest, action="store_true", help=meta.get("help"))
                if meta.get("negative"):
                    group.add_argument(meta["negative"], dest=dest, action="store_false",
                                       help=f"Disable {flag}.")
            elif meta.get("nargs"):
                group.add_argument(*flags, dest=dest, nargs=meta["nargs"], type=meta.get("type"),
                                   help=meta.get("help"))
            else:
                group.add_argument(*flags, dest=dest, type=tp if tp in (int, float) else str,
                                   choices=meta.get("choices"), help=meta.get("help"))
    if extra_args_provider is not None:
        extra_args_provider(parser)
    return parser


def config_from_namespace(ns: argparse.Namespace) -> RunConfig:
    """Defaults, then the preset's model fields, then the explicitly given flags."""
    given = vars(ns)
    preset = given.get("model_preset")
    sections = {}
    for section, cls in SECTIONS.items():
        values = {}
        if section == "model" and preset:
            values.update(get_preset(preset))
        for f in dataclasses.fields(cls):
            key = _dest(section, f.name)
            if key in given:
                values[f.name] = given[key]
        sections[section] = cls(**values)
    return RunConfig(model_preset=preset, **sections)


def _parse(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> RunConfig:
    """Our flags into a RunConfig; Megatron-LM flags we do not carry are classified
    (`config.megatron_lm`): ignored ones print one line each (on the launch's first rank), refused and
    unknown ones are all reported in one ConfigError."""
    import os

    from megatron_rpt.config.megatron_lm import classify
    from megatron_rpt.config.validation import ConfigError
    ns, extra = parser.parse_known_args(argv)
    notices, problems = classify(extra)
    if problems:
        raise ConfigError(problems)
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
        for line in notices:
            print(line, flush=True)
    return config_from_namespace(ns)


def parse_args(argv: Optional[Sequence[str]] = None, extra_args_provider=None) -> RunConfig:
    """Parse the pretraining command line (unvalidated: see `megatron_rpt.validate.validate_config`)."""
    return _parse(build_parser(extra_args_provider), argv)


def parse_rpt_args(argv: Optional[Sequence[str]] = None) -> RunConfig:
    """Parse the `mrpt-rpt` command line: every pretraining flag plus the RPT/GRPO group."""
    parser = build_parser(prog="mrpt-rpt", sections=SECTIONS,
                          description="Reinforcement Pre-Training with GRPO on Megatron-Core (megatron-rpt).")
    return _parse(parser, argv)


def model_flags_argv(flags: dict[str, Any]) -> list[str]:
    """ModelConfig fields (e.g. `convert.hf_config.model_flags_from_hf`'s, or a preset's family) as
    command-line flags of mrpt-pretrain / mrpt-rpt: a boolean equal to its default is left out, a False
    one whose default is True becomes its negative flag (e.g. --disable-bias-linear)."""
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    argv: list[str] = []
    for name, value in flags.items():
        meta = fields[name].metadata
        flag = meta.get("flag") or "--" + name.replace("_", "-")
        if isinstance(value, bool):
            if value != fields[name].default:
                if value:
                    argv.append(flag)
                elif meta.get("negative"):
                    argv.append(meta["negative"])
                else:
                    raise ValueError(f"{name}=False has no command-line flag")
        else:
            argv += [flag, str(value)]
    return argv
