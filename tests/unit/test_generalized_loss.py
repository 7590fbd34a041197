"""The generalized beta/lambda loss in one process (no tensor parallelism) against float64 references.

References: the literal formula (tests/reference_loss.py), the paper's policy gradient written
from the shaped reward, central finite differences in float64, and plain cross-entropy.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_rpt.loss import STAT_NAMES, generalized_vocab_parallel_loss as gloss
from tests.reference_loss import reference_loss, reference_stats, topk_sets

SETTINGS = [  # (beta, lambda_high, lambda_low)
    (0.0, 0.0, 0.0), (-0.25, 0.0, 0.0), (0.5, 0.0, 0.0), (0.0, 0.1, 0.0), (0.0, 0.0, -0.1),
    (-0.25, 0.1, -0.1), (0.3, 0.2, 0.2), (-1.0, -0.3, 0.4),
]


def _inputs(n=12, v=64, vocab=57, scale=3.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)
    x = torch.randint(0, vocab, (n,), generator=g)
    return z, x


def _ours(z, x, **kw):
    leaf = z.detach().clone().requires_grad_(True)
    stats = kw.pop("stats", None)
    loss = gloss(leaf, x, stats=stats, **kw)
    g = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).view(loss.shape)
    (loss * g).sum().backward()
    return loss.detach(), leaf.grad, g


def _ref(z, x, g, **kw):
    zz = z.detach().double().clone().requires_grad_(True)
    loss, sets = reference_loss(zz, x, **kw)
    (loss * g.double()).sum().backward()
    return loss.detach(), zz.grad, sets


@pytest.mark.parametrize("beta,lh,ll", SETTINGS)
@pytest.mark.parametrize("top_k", [1, 5, 100])
def test_matches_float64_reference(beta, lh, ll, top_k):
    z, x = _inputs()
    kw = dict(beta=beta, lambda_high=lh, lambda_low=ll, top_k=top_k)
    loss, grad, g = _ours(z, x, vocab_size=57, **kw)
    rloss, rgrad, _ = _ref(z, x, g, vocab=57, **kw)
    torch.testing.assert_close(loss.double(), rloss, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(grad.double(), rgrad, rtol=1e-5, atol=2e-7)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32


@pytest.mark.parametrize("beta,lh,ll", SETTINGS)
def test_float64_logits_are_exact(beta, lh, ll):
    z, x = _inputs(dtype=torch.float64)
    kw = dict(beta=beta, lambda_high=lh, lambda_low=ll, top_k=7)
    loss, grad, g = _ours(z, x, vocab_size=57, **kw)
    rloss, rgrad, _ = _ref(z, x, g, vocab=57, **kw)
    torch.testing.assert_close(loss, rloss, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(grad, rgrad, rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize("beta,lh,ll", SETTINGS)
def test_gradient_is_the_policy_gradient_of_the_shaped_reward(beta, lh, ll):
    """-dJ/dz with J = sum_a pi(a) r(a) log pi(a) (r stop-gradient), r from the paper's eqs. 11-13."""
    z, x = _inputs(dtype=torch.float64, seed=3)
    k = 6
    _, grad, g = _ours(z, x, beta=beta, lambda_high=lh, lambda_low=ll, top_k=k)
    pi = torch.softmax(z, -1)
    n, v = z.shape
    rows = torch.arange(n)
    in_k = topk_sets(z, k, v)
    r = torch.where(in_k, torch.tensor(lh, dtype=torch.float64), torch.tensor(ll, dtype=torch.float64))
    p = pi[rows, x]
    r[rows, x] = (1 / p) ** ((1 - p) ** beta)
    # d/dz_j sum_a pi_a r_a log pi_a (r fixed) = sum_a pi_a r_a (1[a=j] - pi_j)
    dj = pi * r - pi * (pi * r).sum(-1, keepdim=True)
    torch.testing.assert_close(grad, -g[:, None] * dj, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("beta,lh,ll", SETTINGS)
def test_finite_differences_float64(beta, lh, ll):
    """Central differences of the surrogate with w and the top-k set frozen at the base point."""
    z, x = _inputs(n=3, v=16, vocab=14, dtype=torch.float64, seed=5)
    _, grad, g = _ours(z, x, beta=beta, lambda_high=lh, lambda_low=ll, top_k=4, vocab_size=14)
    _, sets = reference_loss(z, x, beta=beta, lambda_high=lh, lambda_low=ll, top_k=4, vocab=14)
    w, k_neg, t_neg = sets["w"], sets["k_neg"], sets["t_neg"]

    def surrogate(zz):
        logp = torch.log_softmax(zz, -1)
        pi = logp.exp()
        val = -w * logp[torch.arange(3), x] - lh * (pi * k_neg).sum(-1) - ll * (pi * t_neg).sum(-1)
        return (val * g).sum()

    eps = 1e-5   # central differences: truncation ~eps^2, rounding ~1e-16/eps, both < 1e-9 here
    fd = torch.zeros_like(z)
    for i in range(z.shape[0]):
        for j in range(z.shape[1]):
            dz = torch.zeros_like(z)
            dz[i, j] = eps
            fd[i, j] = (surrogate(z + dz) - surrogate(z - dz)) / (2 * eps)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=5e-9)


def test_gradcheck_beta_zero():
    """At beta = 0 the value's own derivative is the gradient (w = 1 has no z dependence)."""
    z, x = _inputs(n=4, v=10, vocab=9, dtype=torch.float64, seed=7)
    zz = z.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda t: gloss(t, x, lambda_high=0.3, lambda_low=-0.2, top_k=3, vocab_size=9), (zz,))


def test_zero_settings_equal_cross_entropy():
    z, x = _inputs(n=32, v=200, vocab=200, scale=5.0)
    loss, grad, g = _ours(z, x)
    zz = z.clone().requires_grad_(True)
    ce = torch.nn.functional.cross_entropy(zz, x, reduction="none")
    (ce * g).sum().backward()
    torch.testing.assert_close(loss, ce.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, zz.grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("beta", [-1.0, -0.9, -0.25, 0.5, 2.0])
def test_target_probability_rounding_to_one_and_zero(beta):
    """pi(x) == 1.0 in fp32 (others underflow), pi(x) ~ 1 - 1e-7, and pi(x) ~ 1e-40: all finite."""
    v = 32
    z = torch.zeros(4, v)
    z[0, 3] = 200.0                # every other exp underflows: 1 - pi is exactly 0
    z[1, 3] = 16.0                 # 1 - pi ~ 3.5e-6
    z[2, 3] = -95.0                # pi ~ 1e-43 (denormal)
    z[3, :] = torch.linspace(-1e4, 1e4, v)   # huge spread
    x = torch.tensor([3, 3, 3, 5])
    for lh, ll in ((0.0, 0.0), (0.1, -0.1)):
        loss, grad, g = _ours(z, x, beta=beta, lambda_high=lh, lambda_low=ll, top_k=4)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), (beta, lh, ll, loss, grad)
        rloss, rgrad, sets = _ref(z.double(), x, g, beta=beta, lambda_high=lh, lambda_low=ll, top_k=4)
        rows = torch.isfinite(sets["w"])            # the literal formula is NaN at pi = 1 exactly
        torch.testing.assert_close(loss[rows].double(), rloss[rows], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad[rows].double(), rgrad[rows], rtol=1e-5, atol=1e-6)
    # at pi(x) = 1 exactly: w -> 1 (beta > -1) or e (beta = -1), so the loss is 0 and the gradient 0
    assert abs(loss[0].item()) < 1e-6 and grad[0].abs().max().item() < 1e-6


def test_target_weight_direction():
    """beta < 0 amplifies (w >= 1), beta > 0 attenuates (w <= 1): loss / CE for lambda = 0."""
    z, x = _inputs(n=64, scale=2.0, seed=11)
    ce, _, _ = _ours(z, x)
    lo, _, _ = _ours(z, x, beta=-0.25)
    hi, _, _ = _ours(z, x, beta=0.5)
    assert (lo >= ce * (1 - 1e-6)).all() and (lo > ce).any()
    assert (hi <= ce * (1 + 1e-6)).all() and (hi < ce).any()


def test_ties_use_the_lowest_ids():
    """Integer logits: many ties at the k-th value; K must be the lowest-id tied entries."""
    g = torch.Generator().manual_seed(2)
    z = torch.randint(-3, 3, (16, 40), generator=g).float()
    x = torch.randint(0, 40, (16,), generator=g)
    for k in (1, 3, 7, 39, 40, 100):
        for lh, ll in ((0.4, -0.3), (-0.2, 0.0)):
            kw = dict(lambda_high=lh, lambda_low=ll, top_k=k)
            st = {}
            loss, grad, gg = _ours(z, x, stats=st, **kw)
            rloss, rgrad, _ = _ref(z, x, gg, **kw)
            torch.testing.assert_close(loss.double(), rloss, rtol=2e-6, atol=2e-6)
            torch.testing.assert_close(grad.double(), rgrad, rtol=1e-5, atol=2e-7)
            rst = reference_stats(z, x, top_k=k)
            torch.testing.assert_close(st["topk_mass"].double(), rst["topk_mass"], rtol=1e-5, atol=1e-6)


def test_padded_vocabulary_is_never_in_topk_or_tail():
    """Padding logits are made the largest: they still count in the softmax (as in Megatron's CE)
    but not in K; results equal the reference that excludes them."""
    z, x = _inputs(n=8, v=48, vocab=40, seed=4)
    z[:, 40:] += 10.0
    kw = dict(beta=-0.25, lambda_high=0.1, lambda_low=-0.1, top_k=5)
    st = {}
    loss, grad, g = _ours(z, x, vocab_size=40, stats=st, **kw)
    rloss, rgrad, sets = _ref(z, x, g, vocab=40, **kw)
    assert not sets["in_k"][:, 40:].any()
    torch.testing.assert_close(loss.double(), rloss, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(grad.double(), rgrad, rtol=1e-5, atol=2e-7)
    rst = reference_stats(z, x, top_k=5, vocab=40)
    for name in ("topk_mass", "tail_mass", "entropy"):
        torch.testing.assert_close(st[name].double(), rst[name], rtol=1e-5, atol=1e-6)


def test_stats_match_reference():
    z, x = _inputs(n=20, v=80, vocab=80, seed=8)
    z[0, x[0]] = 50.0   # a sure top-1 hit
    st = {}
    _ours(z, x, beta=0.5, top_k=10, stats=st)
    assert set(st) == set(STAT_NAMES)
    ref = reference_stats(z, x, top_k=10)
    for name in STAT_NAMES:
        torch.testing.assert_close(st[name].double(), ref[name], rtol=1e-5, atol=1e-6, msg=name)
    assert st["top1"][0] == 1.0


def test_ignored_targets_and_bad_input():
    z, x = _inputs(n=6, v=20, vocab=20)
    x = x.clone()
    x[2] = -100
    st = {}
    loss, grad, _ = _ours(z, x, beta=-0.25, lambda_low=-0.1, top_k=3, stats=st)
    assert loss[2] == 0 and (grad[2] == 0).all() and torch.isfinite(loss).all()
    assert all(math.isnan(st[n][2].item()) for n in STAT_NAMES)
    with pytest.raises(ValueError, match=r"target id 20 at position \(4,\)"):
        gloss(z, torch.tensor([0, 1, 2, 3, 20, 5]))
    with pytest.raises(ValueError, match="target id 19 .* vocabulary \\[0, 18\\)"):
        gloss(z, torch.tensor([0, 1, 2, 3, 19, 5]), vocab_size=18)
    with pytest.raises(ValueError, match="target shape"):
        gloss(z, x[:5])
    with pytest.raises(ValueError, match="integer token ids"):
        gloss(z, x.float())
    with pytest.raises(ValueError, match="beta=-1.5 < -1"):
        gloss(z, x, beta=-1.5)
    with pytest.raises(ValueError, match="top_k must be an integer >= 1"):
        gloss(z, x, top_k=0)
    with pytest.raises(ValueError, match="lambda_low must be a finite number"):
        gloss(z, x, lambda_low=float("nan"))
    with pytest.raises(ValueError, match="vocab_size=21 outside"):
        gloss(z, x, vocab_size=21)
    with pytest.raises(ValueError, match="impl must be"):
        gloss(z, x, impl="cuda")


def test_bf16_and_fp16_logits_use_fp32_math():
    z, x = _inputs(n=16, v=96, vocab=96, scale=4.0, seed=9)
    kw = dict(beta=-0.25, lambda_high=0.1, lambda_low=-0.1, top_k=10)
    for dtype in (torch.bfloat16, torch.float16):
        zl = z.to(dtype)
        loss, grad, g = _ours(zl, x, **kw)
        assert loss.dtype == torch.float32 and grad.dtype == dtype
        rloss, rgrad, _ = _ref(zl.double(), x, g, **kw)    # the reference on the rounded logits
        torch.testing.assert_close(loss.double(), rloss, rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(grad.double(), rgrad, rtol=1e-2, atol=1e-4)   # grad rounded to dtype


def test_chunking_is_bitwise_invariant():
    z, x = _inputs(n=33, v=50, vocab=45, seed=12)
    kw = dict(beta=-0.25, lambda_high=0.1, lambda_low=-0.1, top_k=7, vocab_size=45)
    base = _ours(z, x, **kw)
    for chunk in (1, 4, 32):
        got = _ours(z, x, chunk_tokens=chunk, **kw)
        assert torch.equal(got[0], base[0]) and torch.equal(got[1], base[1]), chunk


def test_inplace_backward_reuses_the_logits_storage():
    z, x = _inputs(n=8, v=30, vocab=30, seed=13)
    kw = dict(beta=0.5, lambda_high=0.1, top_k=4)
    _, ref_grad, _ = _ours(z, x, **kw)
    base = z.clone().requires_grad_(True)
    logits = base * 1.0                               # non-leaf, as the model's output is
    loss = gloss(logits, x, **kw)
    g = torch.linspace(0.5, 1.5, 8)
    (loss * g).sum().backward(retain_graph=True)
    torch.testing.assert_close(base.grad, ref_grad, rtol=0, atol=0)
    torch.testing.assert_close(logits.detach(), ref_grad, rtol=0, atol=0)   # overwritten with the gradient
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss * g).sum().backward()                    # a second backward must fail loudly
    # opting out keeps the logits intact
    logits = base.detach().clone().requires_grad_(True) * 1.0
    loss = gloss(logits, x, inplace_backward=False, **kw)
    loss.sum().backward()
    assert torch.equal(logits.detach(), z)
    # a leaf is never overwritten
    leaf = z.clone().requires_grad_(True)
    gloss(leaf, x, **kw).sum().backward()
    assert torch.equal(leaf.detach(), z)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("beta,lh,ll", [(0.0, 0.0, 0.0), (-0.25, 0.0, 0.0), (0.0, 0.0, -0.1),
                                        (-0.25, 0.1, -0.1), (0.3, 0.2, 0.2)])
@pytest.mark.parametrize("with_stats", [False, True])
def test_overwriting_forward_equals_the_reading_one(dtype, beta, lh, ll, with_stats):
    """overwrite_logits (how the model's head calls the loss): the logits hold exp(z - m) after the
    forward and the gradient after the backward; loss, gradient and statistics are bit for bit those
    of the path that only reads the logits, with padding, ignored targets and ties (integer rows)."""
    z, x = _inputs(n=20, v=48, vocab=43, seed=31, dtype=dtype)
    z[3] = torch.randint(-2, 3, (48,)).to(dtype)               # ties at the threshold
    x[5] = -1                                                  # ignored
    x[6] = int(z[6, :43].argmax())                             # the target is the top-1
    kw = dict(beta=beta, lambda_high=lh, lambda_low=ll, top_k=6, vocab_size=43, chunk_tokens=7)
    g = torch.linspace(0.5, 1.5, 20, dtype=dtype)

    def run(overwrite):
        base = z.clone().requires_grad_(True)
        logits = base * 1.0                                    # non-leaf, as the output layer's is
        st = {} if with_stats else None
        loss = gloss(logits, x, stats=st, overwrite_logits=overwrite, **kw)
        after_forward = logits.detach().clone()
        (loss * g).sum().backward()
        return loss.detach(), base.grad, st, after_forward, logits.detach()

    loss0, grad0, st0, fwd0, _ = run(False)
    loss1, grad1, st1, fwd1, end1 = run(True)
    assert torch.equal(loss0, loss1) and torch.equal(grad0, grad1)
    if with_stats:
        for name in STAT_NAMES:
            torch.testing.assert_close(st0[name], st1[name], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(fwd0, z)                                # reading path: untouched by the forward
    m = z.max(-1, keepdim=True).values
    e = torch.exp(z - m)
    keep = torch.ones_like(e, dtype=torch.bool)
    if (beta, lh, ll) != (0.0, 0.0, 0.0):                      # the target's term is zeroed in the sums
        own = (x >= 0).nonzero()[:, 0]
        keep[own, x[own]] = False
    assert torch.equal(fwd1[keep], e[keep])
    assert torch.equal(end1, grad1)                            # and the gradient over it
    ok = x >= 0
    rloss, rgrad, _ = _ref(z[ok], x[ok], g[ok], beta=beta, lambda_high=lh, lambda_low=ll, top_k=6, vocab=43)
    torch.testing.assert_close(loss1[ok].double(), rloss, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(grad1[ok].double(), rgrad, rtol=1e-5, atol=2e-7)
    assert loss1[5] == 0 and not grad1[5].any()


def test_overwrite_is_ignored_where_it_cannot_apply():
    """bf16 logits are never overwritten (exp(z - m) would lose precision in bf16)."""
    z, x = _inputs(n=6, v=30, vocab=30, seed=32, dtype=torch.bfloat16)
    logits = z.clone().requires_grad_(True) * 1.0
    gloss(logits, x, beta=-0.25, overwrite_logits=True, inplace_backward=False)
    assert torch.equal(logits.detach(), z)


def test_topk_members_are_the_lowest_id_ties():
    """_topk_members against a stable sort (value descending, id ascending) of the whole row, on
    rows whose ties run past the local window and rows where only some ties are in."""
    from megatron_rpt.loss.generalized import _Shard, _local_window, _topk_members, _topk_plan
    g = torch.Generator().manual_seed(33)
    for dtype in (torch.float32, torch.bfloat16):
        z = torch.randint(-3, 4, (24, 70), generator=g).to(dtype)
        z[:4] = (torch.randn(4, 70, generator=g) * 3).to(dtype)
        for k in (1, 4, 9, 30, 70):
            shard = _Shard(None, 0, 1, 70, 66)
            win, widx = _local_window(z, k, 66, None)
            _, t, _, q, partial, _ = _topk_plan(win[None], shard, k, k)
            idx, mask = _topk_members(z, win, widx, t, q, partial, 66, 5)
            order = torch.sort(-z[:, :66].double(), dim=-1, stable=True).indices[:, :k]
            for r in range(z.shape[0]):
                assert sorted(idx[r][mask[r]].tolist()) == sorted(order[r].tolist()), (dtype, k, r)
            if k in (4, 9):
                assert bool(partial.any()), "the integer rows must exercise the tie scan"
    # wide rows: many groups of the prefilter, ties spread over groups and the ragged tail
    v, n_real = 65536 + 77, 65536 + 70
    z = torch.randint(-40, 8, (5, v), generator=g).to(torch.bfloat16)
    z[0, -60:-7] = 7.0                                               # ties inside the tail too
    z[1] = (torch.randn(v, generator=g) * 3).to(torch.bfloat16)
    for k in (3, 50, 130):
        shard = _Shard(None, 0, 1, v, n_real)
        win, widx = _local_window(z, k, n_real, None)
        _, t, _, q, partial, _ = _topk_plan(win[None], shard, k, k)
        idx, mask = _topk_members(z, win, widx, t, q, partial, n_real, 2)
        order = torch.sort(-z[:, :n_real].double(), dim=-1, stable=True).indices[:, :k]
        assert bool(partial.any())
        for r in range(z.shape[0]):
            assert sorted(idx[r][mask[r]].tolist()) == sorted(order[r].tolist()), (k, r)


def test_leading_shape_and_non_contiguous_logits():
    z, x = _inputs(n=12, v=40, vocab=40, seed=14)
    kw = dict(beta=-0.25, lambda_low=-0.1, top_k=5)
    loss2d, grad2d, _ = _ours(z, x, **kw)
    z3 = z.view(3, 4, 40).transpose(0, 1)              # [4, 3, V], non-contiguous
    leaf = z3.detach().clone().requires_grad_(True)
    loss3 = gloss(leaf.transpose(0, 1), x.view(3, 4), **kw)
    assert loss3.shape == (3, 4)
    torch.testing.assert_close(loss3.reshape(-1), loss2d, rtol=0, atol=0)
    g = torch.linspace(0.5, 1.5, 12).view(3, 4)
    (loss3 * g).sum().backward()
    torch.testing.assert_close(leaf.grad.transpose(0, 1).reshape(12, 40), grad2d, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("v", [32000 + 13, 65536 + 13])
def test_topk_prefilter_on_wide_rows(dtype, v):
    """Rows wide enough for the group-max prefilter (groups of 32 from 30k columns, of 64 from 64k),
    ragged tail, ties, -inf entries."""
    from megatron_rpt.loss.generalized import _topk_group, _topk_values
    assert _topk_group(v)
    g = torch.Generator().manual_seed(21)
    z = (torch.randn(6, v, generator=g) * 3).to(dtype)
    z[1] = torch.randint(-2, 3, (v,), generator=g).to(dtype)       # massive ties
    z[2, :20000] = -math.inf
    z[3, -13:] = 50.0                                                # the top values in the ragged tail
    for k in (1, 10, 33):
        vals, cols = _topk_values(z, k)
        assert torch.equal(vals, torch.topk(z, k, dim=-1).values), k
        assert torch.equal(z.gather(1, cols), vals), k                       # the indices hold those values
        assert all(len(set(r.tolist())) == k for r in cols), k              # k distinct columns per row
    x = torch.randint(0, v, (6,), generator=g)
    x[2] = 20000 + x[2] % (v - 20000)                                # a target with a finite logit
    kw = dict(beta=-0.25, lambda_high=0.1, lambda_low=-0.1, top_k=10)
    loss, grad, gg = _ours(z, x, **kw)
    rloss, rgrad, _ = _ref(z.double(), x, gg, **kw)
    torch.testing.assert_close(loss.double(), rloss, rtol=2e-6, atol=2e-6)
    tol = dict(rtol=1e-5, atol=2e-7) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(grad.double(), rgrad, **tol)
