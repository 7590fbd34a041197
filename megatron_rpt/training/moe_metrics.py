"""Router observability for MoE training: expert load per layer, expert-bias statistics, aux/z losses.

`RouterMonitor` puts a forward hook on every Megatron-Core router of this rank's model chunks and
counts, per MoE layer, the tokens routed to each expert in training forwards (evaluation, with
grad disabled, is not counted) since the last collection. `collect()` is a collective: call it on
every rank at the same iterations (the logger's rank-independent `wants_stats`). It sums the counts
over the ranks that see different tokens (tensor x data x context parallel: MoE needs sequence
parallelism with TP, so TP ranks hold different tokens, as Megatron-Core's expert-bias update
assumes) and gathers layers over pipeline stages, then reports per layer:
- `max/mean load` and `min/mean load` (1.0 = perfectly balanced), and the coefficient of variation;
- expert-bias mean / std / min / max (aux-loss-free balancing);
- the load-balancing and z losses Megatron-Core's routers record, when enabled (averaged over the
  micro-batches of the logged iteration).
Summary scalars average the per-layer values.
"""

from __future__ import annotations

from typing import Optional

import torch


class RouterMonitor:
    def __init__(self, model_chunks: list, num_layers: int, num_microbatches: int):
        from megatron.core.transformer.moe.router import TopKRouter
        self.num_layers = num_layers
        self.num_microbatches = num_microbatches
        self.routers: dict[int, torch.nn.Module] = {}  # global 1-based layer number -> router
        for chunk in model_chunks:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    self.routers[int(module.layer_number)] = module
        self.num_experts = next(iter(self.routers.values())).config.num_moe_experts if self.routers else 0
        self._counts: dict[int, torch.Tensor] = {}
        self._handles = [r.register_forward_hook(self._hook(layer)) for layer, r in self.routers.items()]

    @property
    def active(self) -> bool:
        return bool(self.routers)

    def _hook(self, layer: int):
        def hook(module, args, output):
            if not torch.is_grad_enabled():
                return
            routing_map = output[1]
            counts = routing_map.reshape(-1, routing_map.shape[-1]).sum(dim=0, dtype=torch.float64).detach()
            prev = self._counts.get(layer)
            self._counts[layer] = counts if prev is None else prev + counts
        return hook

    def discard(self) -> None:
        """Forget the aux/z losses Megatron-Core recorded this iteration (local, no collective)."""
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker
        clear_aux_losses_tracker()

    def collect(self) -> dict:
        """{name: value} scalars and {"tokens_per_expert": {layer: counts}} (collective, see module doc)."""
        from megatron.core import parallel_state as ps
        if not self.active:
            return {}
        e, L = self.num_experts, self.num_layers
        device = next(iter(self.routers.values())).weight.device
        counts = torch.zeros(L, e, dtype=torch.float64, device=device)
        bias = torch.zeros(L, 4, dtype=torch.float64, device=device)
        has_bias = torch.zeros(L, dtype=torch.float64, device=device)
        for layer, router in self.routers.items():
            if layer in self._counts:
                counts[layer - 1] = self._counts[layer].to(device)
            b = getattr(router, "expert_bias", None)
            if b is not None:
                b = b.detach().to(torch.float64)
                bias[layer - 1] = torch.stack([b.mean(), b.std(unbiased=False), b.min(), b.max()])
                has_bias[layer - 1] = 1.0
        self._counts.clear()
        # Different tokens live on TP (sequence parallel), DP and CP ranks; layers on PP stages.
        torch.distributed.all_reduce(counts, group=ps.get_tensor_and_data_parallel_group(with_context_parallel=True))
        # A stage's own layers hold its values; other stages contribute zeros.
        torch.distributed.all_reduce(counts, group=ps.get_pipeline_model_parallel_group())
        torch.distributed.all_reduce(bias, group=ps.get_pipeline_model_parallel_group())
        torch.distributed.all_reduce(has_bias, group=ps.get_pipeline_model_parallel_group())
        out: dict = {"tokens_per_expert": {}}
        ratios_max, ratios_min, cvs = [], [], []
        for i in range(L):
            c = counts[i]
            if c.sum() <= 0:
                continue
            mean = c.mean()
            out["tokens_per_expert"][i + 1] = c.cpu()
            ratios_max.append(float(c.max() / mean))
            ratios_min.append(float(c.min() / mean))
            cvs.append(float(c.std(unbiased=False) / mean))
            out[f"layer{i + 1:02d}/max-over-mean-load"] = ratios_max[-1]
            out[f"layer{i + 1:02d}/min-over-mean-load"] = ratios_min[-1]
            if has_bias[i] > 0:
                for name, value in zip(("mean", "std", "min", "max"), bias[i].tolist()):
                    out[f"layer{i + 1:02d}/expert-bias-{name}"] = value
        if ratios_max:
            out["max-over-mean-load"] = sum(ratios_max) / len(ratios_max)
            out["min-over-mean-load"] = sum(ratios_min) / len(ratios_min)
            out["load-cv"] = sum(cvs) / len(cvs)
        if has_bias.sum() > 0:
            rows = bias[has_bias > 0]
            out["expert-bias-std"] = float(rows[:, 1].mean())
            out["expert-bias-absmax"] = float(rows[:, 2:].abs().max())
        out.update(self._aux_losses())
        return out

    def _aux_losses(self) -> dict:
        """Megatron-Core's recorded load-balancing / z losses, reduced over ranks, per micro-batch."""
        from megatron.core.transformer.moe.moe_utils import (clear_aux_losses_tracker,
                                                              get_moe_layer_wise_logging_tracker,
                                                              reduce_aux_losses_tracker_across_ranks)
        tracker = get_moe_layer_wise_logging_tracker()
        if not tracker:
            return {}
        from megatron.core import parallel_state as ps
        names = sorted(tracker)
        # Megatron-Core sums over pipeline stages and reduces losses that carry a group; one recorded
        # without a group (the z-loss) stays rank-local: average it over the ranks holding other tokens.
        local = [n for n in names if tracker[n].get("reduce_group") is None and tracker[n].get("avg_group") is None]
        reduce_aux_losses_tracker_across_ranks(names)
        group = ps.get_tensor_and_data_parallel_group(with_context_parallel=True)
        for name in local:
            torch.distributed.all_reduce(tracker[name]["values"], group=group)
            tracker[name]["values"] /= torch.distributed.get_world_size(group)
        out = {}
        for name in names:
            values = tracker[name]["values"].detach().double() / self.num_microbatches
            active = values[values != 0]
            if active.numel():
                out[name.replace("_", "-")] = float(active.mean())
        clear_aux_losses_tracker()
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def format_moe(stats: Optional[dict]) -> str:
    """The log line's MoE part."""
    if not stats or "max-over-mean-load" not in stats:
        return ""
    parts = [f"moe load max/mean: {stats['max-over-mean-load']:.2f}", f"min/mean: {stats['min-over-mean-load']:.2f}"]
    if "expert-bias-std" in stats:
        parts.append(f"expert bias std: {stats['expert-bias-std']:.2e}")
    for name in ("load-balancing-loss", "seq-load-balancing-loss", "z-loss"):
        if name in stats:
            parts.append(f"{name}: {stats[name]:.4f}")
    return " | ".join(parts)
