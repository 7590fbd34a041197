"""megatron-rpt: Megatron-Core pretraining with the generalized beta/lambda next-token loss and RPT.

Import the platform layer (``megatron_rpt.platform.setup_platform``) before any ``megatron.core``
module in an entry point; library modules never choose the device themselves.
"""

__version__ = "0.1.0"
