"""Megatron-Core's "Transformer Engine / Apex not installed" warnings, silenced once per process.

Importing Megatron-Core without TE and Apex (always on CPU) warns six times, from six modules,
that it falls back to torch optimizers, local multi-tensor helpers and the torch norm. Expected, so
it is noise: `megatron_rpt/__init__.py` calls `quiet_megatron_core_backend_warnings()` when the
package is imported, which every entry point, tool and example does before Megatron-Core, and
`setup_platform()` prints one line instead ("> platform: cpu, gloo, ... transformer engine: False
(not installed; local layer specs), apex: False (not installed)").

Only these exact messages, issued by Megatron-Core's own modules, are filtered; any other warning
(from Megatron-Core or elsewhere) is shown as before. This module imports nothing heavy (no torch):
the data tools import it too. See docs/megatron-core-on-cpu.md.
"""

from __future__ import annotations

import re
import warnings

__all__ = ["MEGATRON_CORE_BACKEND_WARNINGS", "quiet_megatron_core_backend_warnings"]

# Issued at import time, with warnings.warn(UserWarning), by megatron-core 0.16.1 and 0.19.2:
# optimizer/__init__.py; optimizer/optimizer.py and distributed/fsdp/.../megatron_fsdp/mixed_precision.py;
# optimizer/clip_grads.py; models/backends.py and models/gpt/gpt_layer_specs.py (and other specs).
MEGATRON_CORE_BACKEND_WARNINGS: tuple[str, ...] = (
    "Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
    "Transformer Engine and Apex are not installed. Falling back to local implementations of "
    "multi_tensor_applier and multi_tensor_scale",
    "Transformer Engine and Apex are not installed. Falling back to local implementations of "
    "multi_tensor_applier, multi_tensor_l2norm, and multi_tensor_scale",
    "Apex is not installed. Falling back to Torch Norm",
)
# The issuing module's __name__ (Megatron-FSDP is also importable as its own top-level package).
_MODULES = r"(megatron\.core|megatron_fsdp)(\.|$)"


def quiet_megatron_core_backend_warnings() -> None:
    """Ignore exactly `MEGATRON_CORE_BACKEND_WARNINGS` from Megatron-Core modules (idempotent)."""
    # (action, message, category, module, lineno); message/module: a compiled regex, a str or None
    present = {getattr(f[1], "pattern", f[1]) for f in warnings.filters if f[0] == "ignore"}
    for message in MEGATRON_CORE_BACKEND_WARNINGS:
        pattern = re.escape(message) + r"\Z"
        if pattern not in present:
            warnings.filterwarnings("ignore", message=pattern, category=UserWarning, module=_MODULES)
