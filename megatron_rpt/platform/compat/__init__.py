"""Megatron-Core on CPU + gloo: the compatibility layer (patch ids P1..P17).

Megatron-Core assumes CUDA in ~760 source lines. Rather than editing call sites, the layer
redirects the CUDA runtime API Megatron-Core uses and installs a process-wide TorchFunctionMode that
rewrites CUDA device arguments to CPU; the few remaining upstream sites are patched one by one.

    hooks.py           the post-import hook and the record of replaced attributes (for undo)
    device_mode.py     the TorchFunctionMode rewriting CUDA device arguments and type names
    cuda_stubs.py      P1 triton stub, P2 RNG, P3 current_device/.cuda(), P4 device literals,
                       P5 streams/events, P8 type names
    cpu_fixes.py       P6, P7, P14, P15, P16: single Megatron-Core sites that break on CPU / gloo
    upstream_fixes.py  P9, P10, P13, P17: upstream bugs and gaps that hit CUDA runs without Apex/TE too
    registry.py        the patch table, version gates, install_cpu_compat / install_upstream_fixes,
                       installed_patches, uninstall_patches (tests)

Nothing is re-exported here: import each name from its module. Only
`megatron_rpt.platform.setup_platform` installs the layer. docs/megatron-core-on-cpu.md describes
every patch, its upstream site and the test that covers it.
"""
