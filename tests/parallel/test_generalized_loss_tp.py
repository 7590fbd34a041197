"""The generalized loss over tensor-parallel shards (TP = 1, 2, 4 gloo ranks).

Each rank holds V/TP of the logits, as the output layer leaves them. TP > 1 must give the TP = 1
loss, gradient and statistics, including top-k sets that cross shards, ties split across ranks,
k larger than a shard, shards made only of Megatron padding, and bf16 logits; at zero settings it
must equal Megatron-Core's vocab_parallel_cross_entropy exactly.

Tolerances: float64 logits are exact (1e-12). fp32 differs only by the summation order of the
softmax sums over V/TP-entry shards: each probability carries a relative error of a few ulps
(~log2(V) + 4 roundings), and a gradient element (gout * weighted probabilities, |gout| < 1.5,
weights < 2) is off by at most 32 ulps of 1 (FP32_ATOL); losses and statistics relatively 2e-6.
Inputs are drawn in float64 and rounded, so they are the same on every CPU (torch's fp32 normal
sampler is vectorised differently on AVX2 and AVX512 machines).
"""

from __future__ import annotations

import pytest
import torch

from megatron_rpt.platform import setup_platform

setup_platform(force_cpu=True)

from megatron_rpt.loss import STAT_NAMES, generalized_vocab_parallel_loss as gloss  # noqa: E402
from tests.dist_harness import run_ranks  # noqa: E402
from tests.reference_loss import reference_loss  # noqa: E402

V = 64
FP32_ATOL = 32 * torch.finfo(torch.float32).eps

CASES = {
    # name: (logit kind, dtype, real vocab, settings)
    "random_padded": ("randn", torch.float32, 50, dict(beta=-0.25, lambda_high=0.1, lambda_low=-0.1, top_k=5)),
    "k_exceeds_shard": ("randn", torch.float32, 61, dict(beta=0.5, lambda_high=0.2, lambda_low=-0.3, top_k=40)),
    "ties_across_ranks": ("int", torch.float32, 64, dict(lambda_high=0.3, lambda_low=-0.2, top_k=9)),
    "ties_k1": ("int", torch.float32, 60, dict(beta=-0.5, lambda_high=-0.1, lambda_low=0.1, top_k=1)),
    "padding_only_shards": ("randn", torch.float32, 10, dict(beta=-0.25, lambda_high=0.1, lambda_low=-0.1, top_k=4)),
    "bf16": ("randn", torch.bfloat16, 64, dict(beta=-0.25, lambda_high=0.1, lambda_low=-0.1, top_k=6)),
    "zero": ("randn", torch.float32, 64, dict()),
    "float64": ("randn", torch.float64, 50, dict(beta=-0.25, lambda_high=0.1, lambda_low=-0.1, top_k=5)),
}


def _case(name):
    kind, dtype, vocab, kw = CASES[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    n = 24
    if kind == "int":
        z = torch.randint(-2, 3, (n, V), generator=g).float()
    else:
        z = torch.randn(n, V, generator=g, dtype=torch.float64) * 3
    z = z.to(dtype)
    x = torch.randint(0, vocab, (n,), generator=g)
    x[5] = -100                                         # an ignored position
    gout = (torch.rand(n, generator=g, dtype=torch.float64) + 0.5).float()
    return z, x, gout, vocab, kw


def _run(shard, x, gout, vocab, kw, **extra):
    leaf = shard.clone().requires_grad_(True)
    stats = {}
    loss = gloss(leaf * 1, x, vocab_size=vocab, stats=stats, **kw, **extra)
    (loss * gout).sum().backward()
    return loss.detach(), leaf.grad, {k: v.detach() for k, v in stats.items()}


def _worker(rank, world, names):
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    ps.initialize_model_parallel(tensor_model_parallel_size=world)
    out = {}
    for name in names:
        z, x, gout, vocab, kw = _case(name)
        per = V // world
        shard = z[:, rank * per:(rank + 1) * per].contiguous()
        out[name] = _run(shard, x, gout, vocab, kw)
        if name == "zero":
            # Megatron-Core's own loss on the same shard (it overwrites its input: give it a copy)
            leaf = shard.clone().requires_grad_(True)
            xm = x.clamp(min=0)
            meg = tensor_parallel.vocab_parallel_cross_entropy(leaf * 1, xm)
            (meg * gout).sum().backward()
            ours = _run(shard, xm, gout, vocab, kw)
            out["megatron"] = (meg.detach(), leaf.grad, ours[0], ours[1])
            # an explicit group argument is the same as Megatron's default group
            out["explicit_group"] = _run(shard, x, gout, vocab, kw, tp_group=ps.get_tensor_model_parallel_group())
    return out


def _single(name):
    z, x, gout, vocab, kw = _case(name)
    return _run(z, x, gout, vocab, kw)


def _single_worker(rank, world, names):
    # Single-process results are computed in a forked worker too: torch math in the pytest parent
    # starts its OpenMP pool, and later forked pretraining workers then hung (seen in CI).
    out = {}
    for name in names:
        out[name] = _single(name)
        if name != "bf16":
            z, x, gout, vocab, kw = _case(name)
            valid = x >= 0
            zz = z.double().clone().requires_grad_(True)
            ref, _ = reference_loss(zz, x.clamp(min=0), vocab=vocab, **kw)
            ((ref * valid) * gout.double()).sum().backward()
            out[name + "/ref"] = (ref.detach(), zz.grad)
    return out


@pytest.fixture(scope="module")
def tp_results():
    out = {world: run_ranks(_worker, world, list(CASES), timeout=300) for world in (1, 2, 4)}
    out["single"] = run_ranks(_single_worker, 1, list(CASES), timeout=300)[0]
    return out


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("world", [1, 2, 4])
def test_tp_equals_single_process(tp_results, name, world):
    loss1, grad1, stats1 = tp_results["single"][name]
    ranks = tp_results[world]
    grad = torch.cat([r[name][1] for r in ranks], dim=1)
    exact = grad1.dtype == torch.float64
    for r in ranks:
        close = dict(rtol=1e-12, atol=1e-12) if exact else dict(rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(r[name][0], loss1, **close)
        for k in STAT_NAMES:
            torch.testing.assert_close(r[name][2][k], stats1[k], equal_nan=True, msg=k, **close)
    if world == 1:
        assert torch.equal(grad, grad1)
    tol = {torch.bfloat16: dict(rtol=1e-2, atol=1e-4), torch.float64: dict(rtol=1e-12, atol=1e-12)}.get(
        grad1.dtype, dict(rtol=1e-5, atol=FP32_ATOL))
    torch.testing.assert_close(grad, grad1, **tol)


@pytest.mark.parametrize("name", [n for n in CASES if n != "bf16"])
def test_single_process_matches_float64_reference(tp_results, name):
    z, x, gout, vocab, kw = _case(name)
    loss, grad, _ = tp_results["single"][name]
    ref, ref_grad = tp_results["single"][name + "/ref"]
    valid = x >= 0
    if loss.dtype == torch.float64:
        torch.testing.assert_close(loss[valid], ref[valid], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    else:
        torch.testing.assert_close(loss[valid].double(), ref[valid], rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=FP32_ATOL)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_zero_settings_equal_megatron_cross_entropy_exactly(tp_results, world):
    for r in tp_results[world]:
        meg_loss, meg_grad, loss, grad = r["megatron"]
        assert torch.equal(loss, meg_loss), (loss - meg_loss).abs().max()
        assert torch.equal(grad, meg_grad), (grad - meg_grad).abs().max()


@pytest.mark.parametrize("world", [2, 4])
def test_explicit_group_equals_default(tp_results, world):
    for r in tp_results[world]:
        assert torch.equal(r["explicit_group"][0], r["zero"][0])
        assert torch.equal(r["explicit_group"][1], r["zero"][1])
