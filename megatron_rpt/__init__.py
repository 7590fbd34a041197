"""megatron-rpt: Megatron-Core pretraining with the generalized beta/lambda next-token loss and RPT.

Import the platform layer (``megatron_rpt.platform.setup_platform``) before any ``megatron.core``
module in an entry point; library modules never choose the device themselves.
"""

from megatron_rpt.platform.messages import quiet_megatron_core_backend_warnings as _quiet

__version__ = "0.1.0"

# Every entry point, tool and example imports this package before Megatron-Core: its expected
# "Transformer Engine / Apex not installed" warnings are silenced here, once (setup_platform prints
# one "> platform: ..." line instead).
_quiet()
