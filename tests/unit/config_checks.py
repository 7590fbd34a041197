"""Helpers of the configuration tests: run `validate_config` on a base command line plus a test's flags
and return the problems it reports."""

import pytest

from megatron_rpt.config import ConfigError, parse_args
from megatron_rpt.validate import validate_config


def config_checkers(base: list):
    """(problems, one_problem) for command lines `base + argv`: every problem of an invalid configuration,
    or the only one (asserting there is exactly one)."""
    def problems(argv, world_size=1):
        with pytest.raises(ConfigError) as e:
            validate_config(parse_args(base + argv), world_size)
        return e.value.problems

    def one_problem(argv, world_size=1):
        found = problems(argv, world_size)
        assert len(found) == 1, found
        return found[0]

    return problems, one_problem
