"""Suite-wide settings: silence Megatron-Core's expected "no Apex/TE" warnings on CPU machines."""

_EXPECTED_WARNINGS = (
    "ignore:Transformer Engine and Apex are not installed:UserWarning",
    "ignore:Apex is not installed:UserWarning",
    "ignore:The 'megatron.core.transformer.custom_layers.transformer_engine':DeprecationWarning",
    "ignore:full scope is deprecated:UserWarning",
)


def pytest_configure(config):
    for line in _EXPECTED_WARNINGS:
        config.addinivalue_line("filterwarnings", line)
