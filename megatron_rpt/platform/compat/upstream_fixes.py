"""Upstream Megatron-Core bugs and gaps that also hit CUDA runs: P9, P10, P13, P17.

Without Apex and Transformer Engine, Megatron-Core falls back to torch.optim.AdamW and to code paths
that its own GPU runs rarely take. Three of them are broken on any device: the distributed
optimizer's checkpoint load (P9: KeyError 'step'; P10: one shared Adam `step`, silently wrong after
a resume) and the MoE router's `te_general_gemm` NameError (P13, 0.16.x). The torch norm also lacks
the zero-centred weights of --apply-layernorm-1p (P17), which TE's and Apex's norms have. They are the only patches
`registry.install_upstream_fixes()` applies on CUDA, besides all CPU runs.

Each patch's docstring names its upstream site (file:function in megatron-core) and the versions it
is gated on; `registry.py` is the table. See docs/megatron-core-on-cpu.md.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from megatron_rpt.platform.compat.hooks import new_with_config_flag_off, set_attr, when_imported

def _p9_optimizer_state_copy() -> None:
    """P9: `optimizer/distrib_optimizer.py:DistributedOptimizer._set_main_param_and_optimizer_states`
    (0.19.2 lines 1219-1225) with the torch AdamW fallback (no Apex/TE, GPU too): copies every key
    of the live state, including `step` that the checkpoint lacks (KeyError: 'step'), and writes
    in place into a leaf that requires grad. With the `dp_reshardable` layout (Megatron-LM's default)
    the loading state dict does carry a per-parameter `step`: the freshly prepared optimizer's (1),
    copied over the saved step that `load_state_dict` had just set from the param groups, so bias
    correction restarts (silent). Checked against megatron-core >=0.16,<0.20 (0.16.1, 0.19.2).
    Runs on GPU too (cpu_only=False: `install_upstream_fixes`).

    Copies only the keys the checkpoint has, `step` never (it comes from the param groups), under no_grad.
    """

    def fix(mod: types.ModuleType) -> None:
        cls = mod.DistributedOptimizer
        original = cls._set_main_param_and_optimizer_states

        def _set_main_param_and_optimizer_states(self: Any, model_param: Any, tensors: dict) -> None:
            if getattr(self.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False):
                return original(self, model_param, tensors)
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            dst = {"param": main_param, **self.optimizer.state[main_param]}
            with torch.no_grad():
                for key, value in tensors.items():
                    if key in dst and key != "step":
                        dst[key].copy_(value)

        set_attr("P9", cls, "_set_main_param_and_optimizer_states", _set_main_param_and_optimizer_states)

    when_imported("P9", "megatron.core.optimizer.distrib_optimizer", fix)


def _p10_unshare_step() -> None:
    """P10: `optimizer/distrib_optimizer.py:DistributedOptimizer.load_state_dict` (0.19.2 lines
    1025-1031) gives every param state ONE shared `step` tensor with the torch AdamW fallback;
    torch AdamW increments it in place once per param, so after a resume bias correction uses a
    wrong step. Silent: resumed runs diverge. Checked against megatron-core >=0.16,<0.20 (0.16.1, 0.19.2).
    Runs on GPU too (cpu_only=False: `install_upstream_fixes`).

    Gives each param its own copy of `step` after loading.
    """

    def fix(mod: types.ModuleType) -> None:
        cls = mod.DistributedOptimizer
        original = cls.load_state_dict

        def load_state_dict(self: Any, state_dict: dict) -> Any:
            out = original(self, state_dict)
            for state in self.optimizer.state.values():
                step = state.get("step")
                if torch.is_tensor(step):
                    state["step"] = step.detach().clone()
            return out

        set_attr("P10", cls, "load_state_dict", load_state_dict)

    when_imported("P10", "megatron.core.optimizer.distrib_optimizer", fix)



def _p13_te_general_gemm() -> None:
    """P13: `transformer/moe/moe_utils.py:router_gating_linear` (0.16.1 line 1192) reads
    `te_general_gemm`, which is only defined when Transformer Engine imports -> NameError in every
    MoE router without TE (0.19 defines it as None itself). Applies to megatron-core >=0.16,<0.17;
    checked against megatron-core >=0.16,<0.20 (0.16.1, 0.19.2).
    Runs on GPU too (cpu_only=False: `install_upstream_fixes`).

    Defines it as None when missing.
    """

    def fix(mod: types.ModuleType) -> None:
        if not hasattr(mod, "te_general_gemm"):
            set_attr("P13", mod, "te_general_gemm", None)

    when_imported("P13", "megatron.core.transformer.moe.moe_utils", fix)


# 0.19.2 sets te_general_gemm = None itself without TE; 0.17.x / 0.18.x are assumed to as well (only
# 0.16.1 and 0.19.2 are tested).
_P13_VERSIONS = SpecifierSet(">=0.16,<0.17")


def _p13_applies(v: Version) -> bool:
    """P13's gate: megatron-core >=0.16,<0.17."""
    return _P13_VERSIONS.contains(v, prereleases=True)



def _p17_zero_centred_torch_norm() -> None:
    """P17 (new; a missing feature): `transformer/torch_norm.py:WrappedTorchNorm.__new__`, the norm of
    Megatron-Core's local layer spec without Apex (any device), asserts `layernorm_zero_centered_gamma`
    is off, so Megatron-LM's --apply-layernorm-1p fails at model build.
    Checked against megatron-core >=0.16,<0.20 (0.16.1, 0.19.2). Runs on GPU too (cpu_only=False:
    `install_upstream_fixes`).

    Builds the torch norm with the flag off and turns it into the zero-centred variant TE's norms
    implement (`transformer_engine.pytorch.LayerNorm/RMSNorm(zero_centered_gamma=True)`): the weight
    is initialised to zeros and the output multiplied by (1 + weight). Same parameters and state-dict
    keys, so checkpoints move between this and TE's layers.
    """

    class ZeroCentredLayerNorm(torch.nn.LayerNorm):
        def reset_parameters(self) -> None:
            super().reset_parameters()
            if self.weight is not None:
                torch.nn.init.zeros_(self.weight)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.layer_norm(x, self.normalized_shape, self.weight + 1, self.bias, self.eps)

    class ZeroCentredRMSNorm(torch.nn.RMSNorm):
        def reset_parameters(self) -> None:
            super().reset_parameters()
            if self.weight is not None:
                torch.nn.init.zeros_(self.weight)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.rms_norm(x, self.normalized_shape, self.weight + 1, self.eps)

    zero_centred = {torch.nn.LayerNorm: ZeroCentredLayerNorm, torch.nn.RMSNorm: ZeroCentredRMSNorm}

    def zero_centre(norm: Any, config: Any) -> Any:
        target = zero_centred.get(type(norm))
        if target is None:
            raise ValueError(f"--apply-layernorm-1p: no zero-centred variant of {type(norm).__name__} "
                             f"(normalization {config.normalization!r}); use LayerNorm or RMSNorm")
        norm.__class__ = target
        norm.reset_parameters()
        return norm

    def fix(mod: types.ModuleType) -> None:
        # wraps the __new__ in place: P7's on CPU (sequence parallelism), upstream's elsewhere
        new_with_config_flag_off("P17", mod.WrappedTorchNorm, "layernorm_zero_centered_gamma", zero_centre)

    when_imported("P17", "megatron.core.transformer.torch_norm", fix)
