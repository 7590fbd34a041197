"""Triton kernels of the generalized loss (`megatron_rpt/loss/triton_kernels.py`) against the torch
reference passes in `generalized.py`, column by column, then the whole loss with impl="triton".

Without a GPU the kernels run on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1; when the
variable is not set, test_in_fresh_interpreter reruns this file in a new process with it), which
is slow (~0.1-0.3 s per launch here), so shapes are small: 12 rows x 300 columns with 64-wide tiles
(300 is not a multiple of 64, so every row ends in a partial tile). With CUDA and
TRITON_INTERPRET unset, the same tests run the compiled kernels on the GPU.

Tolerances: fp32 outputs within 2e-6 relative (interpreter: numpy vs torch exp and a different
summation order; compiled CUDA kernels use the approximate ex2 for tl.exp, hence 2e-5 there);
bf16/fp16 gradients within one unit in the last place of their dtype (the fp32 value may round
the other way), with almost all entries bit-identical; counts and gathered values exact.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
from typing import Optional

import pytest
import torch

_ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
# Triton decides at its import whether its own library functions (tl.zeros, ...) are interpreted,
# and later lazy imports check that TRITON_INTERPRET still agrees, so the variable must be set for
# the whole life of the process. This module therefore runs its tests in this process only when
# the variable was already set (or on a GPU); otherwise test_in_fresh_interpreter runs this file in
# a new process with TRITON_INTERPRET=1, leaving the calling process and its environment alone.
_IN_PROCESS = _ON_GPU or os.environ.get("TRITON_INTERPRET") == "1"

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton; CPU tests use its interpreter)")
if not _ON_GPU and tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 7):
    pytest.skip("Triton < 3.7's interpreter fails on `range(0, V, BLOCK)` over a scalar argument with numpy 2 "
                "(compiled kernels are fine)", allow_module_level=True)

from megatron_rpt.loss import generalized as gl  # noqa: E402
from megatron_rpt.loss import triton_kernels as tk  # noqa: E402

DEVICE = "cuda" if _ON_GPU else "cpu"
RTOL32 = 2e-5 if _ON_GPU else 2e-6
V, N_REAL, BLOCK = 300, 283, 64
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

in_process = pytest.mark.skipif(not _IN_PROCESS, reason="TRITON_INTERPRET=1 is not set in this process: "
                                "test_in_fresh_interpreter runs these tests in a new one")


@pytest.fixture(scope="module", autouse=True)
def _kernels_mode():
    """The CPU tests must really run the interpreter (compiled kernels cannot take CPU tensors)."""
    if _IN_PROCESS and not _ON_GPU:
        from triton.runtime.interpreter import InterpretedFunction

        assert all(isinstance(k, InterpretedFunction) for k in tk._kernels())
    yield


@pytest.mark.skipif(_IN_PROCESS, reason="the tests of this module run in this process")
@pytest.mark.slow   # a fresh interpreter / server process
def test_in_fresh_interpreter() -> None:
    """Run this file in a new Python process with TRITON_INTERPRET=1 set before triton's import.

    With 2 CPU cores this takes ~30 s: Python/torch start-up plus ~100 interpreted launches.
    """
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__),
                           "-k", "not test_in_fresh_interpreter"],
                          cwd=root, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
                          timeout=600)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0 and "passed" in summary and "skipped" not in summary, \
        proc.stdout[-6000:] + proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# One batch of rows covering the cases; each kernel launch checks all of them at once.
# ---------------------------------------------------------------------------------------------

def _batch(dtype: torch.dtype, n_real: int, seed: int = 0) -> dict:
    """12 rows x V columns of logits plus per-row m, x_local, t, q_local, partial, s, W, w, g, e_x and
    the top-k members as the forward hands them to backward (k_idx, k_mask: every entry > t and the
    first q ties in index order, all ties where q takes them all).

    Rows 0-5 are integer-valued (values -4..3), so each holds ~37 exact ties at t = 2, spread over
    all tiles; rows 6-9 are Gaussian; row 10 spans 1e4; row 11 has a third of its entries at -1e30
    (fp16: its most negative finite value).
    """
    gen = torch.Generator().manual_seed(seed)
    n = 12
    zf = torch.randn(n, V, generator=gen) * 2
    zf[:6] = torch.randint(-4, 4, (6, V), generator=gen).float()
    zf[10] = torch.linspace(-1e4, 0, V)[torch.randperm(V, generator=gen)]
    zf[11, ::3] = -65504.0 if dtype == torch.float16 else -1e30
    z = zf.to(dtype)
    zf = z.float()                                   # the values the kernels actually see
    real = zf[:, :n_real]

    t = torch.topk(real, 10, dim=-1).values[:, -1]   # a k-th largest value: one exact tie in Gaussian rows
    t[:6] = 2.0
    t[3] = 3.0                                       # a row whose max is the threshold
    eq = real == t[:, None]
    ties = [torch.nonzero(eq[i])[:, 0] for i in range(n)]
    cnt = eq.sum(-1)
    assert bool((cnt[:6] >= 20).all())               # ties in several tiles

    x = torch.randint(0, n_real, (n,), generator=gen)
    x[0] = ties[0][-1]                               # the last tie, outside the first q (lambda_low)
    x[1] = ties[1][0]                                # the first tie: nothing before it
    z[2, 0] = 2.0                                    # x == 0 at a tie
    zf[2, 0] = 2.0
    x[2] = 0
    x[3] = -1                                        # not the owner shard
    x[4] = ties[4][-1] + 1 if ties[4][-1] + 1 < n_real else 0   # after the ties, not a tie itself
    while zf[4, x[4]] == t[4]:
        x[4] += 1
    x[5] = ties[5][len(ties[5]) // 2]                # a middle tie of a partial row
    x[8] = -1
    x[9] = n_real - 1                                # last real column
    x[11] = 1                                        # not at -1e30
    eq = zf[:, :n_real] == t[:, None]
    cnt = eq.sum(-1)

    # Tie quota of the top-k set: partial rows take the first q ties in index order.
    q = torch.zeros(n, dtype=torch.long)
    partial = torch.zeros(n, dtype=torch.bool)
    q[0], partial[0] = cnt[0] // 2, True             # the quota ends in a later tile than it starts
    q[1] = cnt[1]                                    # all ties in, no prefix rule
    q[2] = 0                                         # no tie in
    q[3], partial[3] = cnt[3] // 3, True
    q[4], partial[4] = 1, True
    q[5], partial[5] = cnt[5] - 1, True              # x may or may not be among the first q
    q[6] = cnt[6]
    q[7], partial[7] = cnt[7], True
    assert int(torch.nonzero(eq[0])[q[0] - 1, 0]) >= BLOCK   # the running count matters

    m = zf.amax(-1)
    m[[3, 8]] += 1.5                                 # the row max lives on another shard
    s = torch.exp(zf - m[:, None]).sum(-1) * (1 + torch.rand(n, generator=gen))
    w = torch.rand(n, generator=gen)
    big_w = w + torch.rand(n, generator=gen)
    g = torch.randn(n, generator=gen)
    g[7] = 0.0                                       # an ignored token
    members = []
    for i in range(n):
        above = torch.nonzero(zf[i, :n_real] > t[i])[:, 0]
        tied = torch.nonzero(eq[i])[:, 0][:int(q[i])]
        members.append(torch.cat([above, tied]))
    width = max(len(mb) for mb in members)
    k_idx = torch.zeros(n, width, dtype=torch.long)
    k_mask = torch.zeros(n, width, dtype=torch.bool)
    for i, mb in enumerate(members):
        k_idx[i, :len(mb)], k_mask[i, :len(mb)] = mb, True
    assert bool(((k_idx == x[:, None]) & k_mask).any(-1)[5])   # a target inside K (lambda 0 wins)
    e_x = torch.where(x >= 0, torch.exp(zf.gather(1, x.clamp(min=0)[:, None])[:, 0] - m), 0.0)
    out = dict(z=z, m=m, x=x, t=t, q=q, partial=partial, s=s, big_w=big_w, w=w, g=g, e_x=e_x,
               k_idx=k_idx, k_mask=k_mask)
    return {k: v.to(DEVICE) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# row_sums
# ---------------------------------------------------------------------------------------------

# (zero_target, want_entropy, n_real): each flag both ways, padded and unpadded shards.
_ROW_FLAGS = [(True, True, N_REAL), (False, False, N_REAL), (True, False, V), (False, True, N_REAL)]


@in_process
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("zero_target,want_entropy,n_real", _ROW_FLAGS)
def test_row_sums_matches_torch(dtype, zero_target, want_entropy, n_real) -> None:
    b = _batch(dtype, n_real)
    kw = dict(n_real=n_real, zero_target=zero_target, want_entropy=want_entropy)
    ref = gl.row_sums_torch(b["z"], b["m"], b["x"], **kw)
    got = tk.row_sums_triton(b["z"], b["m"], b["x"], **kw, block_size=BLOCK)
    assert got.dtype == torch.float32 and got.shape == (12, 6)

    # Sums (different order): relative; row 11's ent_dot has -1e30 * 0 = -0 terms, still finite.
    for col in (0, 4, 5):
        torch.testing.assert_close(got[:, col], ref[:, col], rtol=RTOL32, atol=1e-30, msg=f"column {col}")
    # Gathered target terms: one exp of the same fp32 difference (atol: subnormal results may be
    # flushed to zero by CUDA's approximate exp).
    torch.testing.assert_close(got[:, 1], ref[:, 1], rtol=RTOL32, atol=1e-30)
    assert torch.equal(got[:, 2], ref[:, 2]) and torch.equal(got[:, 3], ref[:, 3])
    if not want_entropy:
        assert bool((got[:, 5] == 0).all())
    if n_real == V:
        assert bool((got[:, 4] == 0).all())
    else:
        assert bool((ref[:, 4] > 0).any())
    # Fixed reduction order: a second launch is bit-identical.
    assert torch.equal(got, tk.row_sums_triton(b["z"], b["m"], b["x"], **kw, block_size=BLOCK))


# ---------------------------------------------------------------------------------------------
# write_grad
# ---------------------------------------------------------------------------------------------

_ULP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}   # spacing relative to [1, 2)
# Triton 3.9's interpreter casts fp32 -> bf16 by truncation (compiled kernels round to nearest
# even, like torch); fp16 rounds to nearest even in both.
_TRUNCATES_BF16 = not _ON_GPU


def _assert_stored(out: torch.Tensor, v32: torch.Tensor, by_torch: Optional[torch.Tensor] = None) -> None:
    """`out` is what storing the kernel's fp32 values `v32` in out's dtype must give; entries marked
    in `by_torch` (the top-k members, rewritten by torch after the kernel) round as torch does."""
    if by_torch is not None and bool(by_torch.any()):
        assert torch.equal(out[by_torch], v32[by_torch].to(out.dtype))
        keep = ~by_torch
        out, v32 = out[keep], v32[keep]
    if out.dtype == torch.bfloat16 and _TRUNCATES_BF16:
        # Truncation = masking the low 16 bits. The interpreter also mangles fp32 subnormals
        # (-4e-45 -> -6e-39): for those only check that they stay below bf16's smallest normal.
        normal = v32.abs() >= torch.finfo(torch.float32).tiny
        want = (v32.view(torch.int32) & -65536).view(torch.float32).to(out.dtype)
        assert torch.equal(out[normal], want[normal])
        assert bool((out[~normal].float().abs() <= torch.finfo(out.dtype).tiny).all())
    else:
        assert torch.equal(out, v32.to(out.dtype))


def _assert_grad_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Gradients in the logits' dtype: fp32 within RTOL32; bf16/fp16 within one ulp (the fp32
    values agree to ~1e-6 and may round the other way), and nearly always identical."""
    assert got.dtype == ref.dtype
    if ref.dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=RTOL32, atol=1e-12)
        return
    gf, rf = got.float(), ref.float()
    tiny = torch.finfo(ref.dtype).tiny
    assert bool(((gf - rf).abs() <= _ULP[ref.dtype] * rf.abs() + tiny).all()), float((gf - rf).abs().max())
    if not (ref.dtype == torch.bfloat16 and _TRUNCATES_BF16):
        assert float((gf != rf).float().mean()) < 0.01


# (lambda_high, lambda_low, n_real): cross-entropy-like, equal (no split), split both signs.
_LAMS = [(0.0, 0.0, N_REAL), (0.4, 0.4, V), (0.7, 0.2, N_REAL), (-0.3, 0.5, V)]


@in_process
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lam_h,lam_l,n_real", _LAMS)
def test_write_grad_matches_torch(dtype, lam_h, lam_l, n_real) -> None:
    b = _batch(dtype, n_real, seed=1)
    z = b["z"]
    split = lam_h != lam_l
    kw = dict(n_real=n_real, lambda_high=lam_h, lambda_low=lam_l, k_idx=b["k_idx"] if split else None,
              k_mask=b["k_mask"] if split else None)
    args = (b["m"], b["s"], b["big_w"], b["w"], b["g"], b["x"], b["e_x"])

    # The fp32 values themselves (an fp32 `out` for any logits dtype): column by column.
    ref32 = torch.empty(z.shape, dtype=torch.float32, device=DEVICE)
    gl.write_grad_torch(z, ref32, *args, **kw)
    got32 = torch.full_like(ref32, float("nan"))
    tk.write_grad_triton(z, got32, *args, **kw, block_size=BLOCK)
    torch.testing.assert_close(got32, ref32, rtol=RTOL32, atol=1e-12)

    # Out of place in the logits' dtype: z untouched, every entry written, rounded from got32.
    out = torch.full_like(z, float("nan"))
    z_before = z.clone()
    tk.write_grad_triton(z, out, *args, **kw, block_size=BLOCK)
    assert torch.equal(z, z_before)
    by_torch = None
    if split:
        by_torch = torch.zeros(z.shape, dtype=torch.bool, device=DEVICE)
        rows, slots = b["k_mask"].nonzero(as_tuple=True)
        by_torch[rows, b["k_idx"][rows, slots]] = True
        own = (b["x"] >= 0).nonzero()[:, 0]
        by_torch[own, b["x"][own]] = False
    _assert_stored(out, got32, by_torch)
    ref = torch.empty_like(z)
    gl.write_grad_torch(z, ref, *args, **kw)
    _assert_grad_close(out, ref)

    # In place (out is z): each tile is read before it is overwritten.
    zi = z.clone()
    tk.write_grad_triton(zi, zi, *args, **kw, block_size=BLOCK)
    assert torch.equal(zi, out)

    # The batch discriminates: along row 0 (x = its last tie) the first q ties get lambda_high, the
    # rest lambda_low, and the q-th tie sits beyond the first tile.
    if split:
        zf = z.float()
        pi = torch.exp(zf - b["m"][:, None]) / b["s"][:, None]
        lam_seen = b["big_w"][0] - ref32[0] / (b["g"][0] * pi[0])
        ties0 = torch.nonzero(zf[0, :n_real] == b["t"][0])[:, 0][:-1]
        q0 = int(b["q"][0])
        torch.testing.assert_close(lam_seen[ties0[:q0]], torch.full((q0,), lam_h, device=DEVICE), atol=1e-4, rtol=0)
        torch.testing.assert_close(lam_seen[ties0[q0:]], torch.full((len(ties0) - q0,), lam_l, device=DEVICE),
                                   atol=1e-4, rtol=0)


@in_process
def test_write_grad_extreme_rows_are_finite() -> None:
    """1e4 spread and -1e30 entries: probabilities underflow to exactly 0, never NaN."""
    b = _batch(torch.float32, N_REAL)
    out = torch.empty_like(b["z"])
    tk.write_grad_triton(b["z"], out, b["m"], b["s"], b["big_w"], b["w"], b["g"], b["x"], b["e_x"],
                         n_real=N_REAL, lambda_high=0.7, lambda_low=0.2, k_idx=b["k_idx"], k_mask=b["k_mask"],
                         block_size=BLOCK)
    assert bool(torch.isfinite(out).all())
    assert bool((out[11, ::3] == 0).all()) and int((out[10] == 0).sum()) > V // 2


@in_process
def test_rejects_float64_and_reports_availability() -> None:
    z = torch.zeros(2, 8, dtype=torch.float64, device=DEVICE)
    zeros = torch.zeros(2, device=DEVICE)
    x = torch.zeros(2, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="float64"):
        tk.row_sums_triton(z, zeros, x, n_real=8, zero_target=True, want_entropy=False)
    with pytest.raises(ValueError, match="float64"):
        tk.write_grad_triton(z, z, zeros, zeros, zeros, zeros, zeros, x, n_real=8, lambda_high=0.0,
                             lambda_low=0.0)
    assert tk.available() is torch.cuda.is_available()
    # Never raises: no triton at all, or the platform's P1 stub module standing in for it.
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "triton", None)
        assert tk.available() is False
        stub = types.ModuleType("triton")
        stub.__megatron_rpt_stub__ = True
        mp.setitem(sys.modules, "triton", stub)
        mp.setitem(sys.modules, "triton.language", types.ModuleType("triton.language"))
        assert tk.available() is False
    # No rows: nothing to launch.
    empty = torch.zeros(0, 8, device=DEVICE)
    assert tk.row_sums_triton(empty, zeros[:0], x[:0], n_real=8, zero_target=False,
                              want_entropy=True).shape == (0, 6)


# ---------------------------------------------------------------------------------------------
# End to end: the loss with impl="triton" vs impl="torch"
# ---------------------------------------------------------------------------------------------

_E2E = [
    # dtype, beta, lambda_high, lambda_low, top_k, vocab_size, stats, ties, inplace
    (torch.float32, 0.0, 0.0, 0.0, 5, None, False, False, True),      # plain cross-entropy
    (torch.bfloat16, 0.5, 0.3, 0.1, 7, N_REAL, True, True, True),    # split lambdas, ties, padding
    (torch.float16, -0.5, 0.2, 0.2, 20, N_REAL, False, False, True),  # equal lambdas
    (torch.float32, 1.0, 0.5, 0.0, 3, None, True, True, False),      # ties at the k-th value, leaf logits
]


@in_process
@pytest.mark.parametrize("dtype,beta,lam_h,lam_l,top_k,vocab_size,with_stats,ties,inplace", _E2E)
def test_loss_triton_matches_torch(monkeypatch, dtype, beta, lam_h, lam_l, top_k, vocab_size, with_stats,
                                   ties, inplace) -> None:
    monkeypatch.setattr(tk, "_DEFAULT_BLOCK", BLOCK)     # several tiles per row
    gen = torch.Generator().manual_seed(3)
    shape = (2, 4, V)
    base = (torch.randint(-3, 3, shape, generator=gen).float() if ties
            else torch.randn(shape, generator=gen) * 3).to(dtype)
    target = torch.randint(0, vocab_size or V, shape[:2], generator=gen)
    target[1, 2] = -1                                     # ignored token
    upstream = torch.randn(shape[:2], generator=gen)

    results = {}
    for impl in ("torch", "triton"):
        leaf = base.clone().to(DEVICE).requires_grad_(True)
        logits = leaf * 1 if inplace else leaf            # non-leaf: backward writes into it in place
        stats = {} if with_stats else None
        loss = gl.generalized_vocab_parallel_loss(
            logits, target.to(DEVICE), beta=beta, lambda_high=lam_h, lambda_low=lam_l, top_k=top_k,
            vocab_size=vocab_size, stats=stats, impl=impl, chunk_tokens=3)
        version = logits._version
        (loss * upstream.to(DEVICE)).sum().backward()
        if inplace:   # the gradient went into the logits' storage, and autograd knows it
            assert logits._version > version
        results[impl] = (loss.detach(), leaf.grad, stats)

    (l_ref, g_ref, s_ref), (l_tri, g_tri, s_tri) = results["torch"], results["triton"]
    torch.testing.assert_close(l_tri, l_ref, rtol=10 * RTOL32, atol=1e-6)
    assert float(l_ref[1, 2]) == 0.0 and float(l_tri[1, 2]) == 0.0
    _assert_grad_close(g_tri, g_ref)
    assert bool((g_tri[1, 2] == 0).all())
    if with_stats:
        for name in gl.STAT_NAMES:
            torch.testing.assert_close(s_tri[name], s_ref[name], rtol=10 * RTOL32, atol=1e-6, equal_nan=True,
                                       msg=name)
