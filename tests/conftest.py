"""Suite-wide settings: silence Megatron-Core's expected "no Apex/TE" warnings on CPU machines, and
mark the end-to-end and cluster tests `slow` (`make test-fast` runs the rest: `-m "not slow"`;
unit tests that start a fresh interpreter or a server carry `@pytest.mark.slow` themselves)."""

from pathlib import Path

_EXPECTED_WARNINGS = (
    "ignore:Transformer Engine and Apex are not installed:UserWarning",
    "ignore:Apex is not installed:UserWarning",
    "ignore:The 'megatron.core.transformer.custom_layers.transformer_engine':DeprecationWarning",
    "ignore:full scope is deprecated:UserWarning",
)
_SLOW_FOLDERS = ("e2e", "slurm", "external")   # whole tools, real clusters, real servers


def pytest_configure(config):
    for line in _EXPECTED_WARNINGS:
        config.addinivalue_line("filterwarnings", line)
    config.addinivalue_line("markers", "slow: end-to-end / cluster test, or one that starts a fresh interpreter or "
                                       "a server (deselected by `make test-fast`)")


def pytest_collection_modifyitems(config, items):
    import pytest
    tests = Path(__file__).resolve().parent
    for item in items:
        parts = Path(item.fspath).resolve().relative_to(tests).parts
        if parts and parts[0] in _SLOW_FOLDERS:
            item.add_marker(pytest.mark.slow)
