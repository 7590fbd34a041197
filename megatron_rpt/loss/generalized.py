"""The generalized beta/lambda next-token loss ("Diversity or Precision?"), vocab-parallel.

Per token, with pi = softmax(z) over the whole (padded) vocabulary and target x:

    loss = -w * log pi(x) - lambda_high * pi(K \\ {x}) - lambda_low * pi(T \\ {x})
    w    = sg(pi(x) ** (1 - (1 - pi(x)) ** beta))

K is the global top-k of the REAL vocabulary (Megatron's padded entries take part in the softmax,
exactly as in Megatron's cross-entropy, but are never in K nor in the tail T = real \\ K). The
gradient is the policy gradient of the paper's shaped reward: dloss/dz_j = pi_j * (W - lam_j) -
w * 1[j = x], with lam_j = lambda_high on K \\ {x}, lambda_low on T \\ {x}, 0 on x and padding, and
W = w + lambda_high * pi(K \\ {x}) + lambda_low * pi(T \\ {x}).

Top-k ties: K is the k largest logits, ties at the k-th value broken by the LOWER global vocabulary
id (the order of a stable descending sort), so K is deterministic and independent of the
tensor-parallel size. It is computed exactly without gathering logits: every rank's k largest
logits contain all of its members of the global top-k, and a window's tie count is exact whenever
it matters for the tie quota (see `_topk_plan`).

Collectives (tensor-parallel group; forward only, backward communicates nothing):
  1. an all-gather of each rank's local top-k logits plus the max of its padded entries, [N, k'+1]
     fp32 (when no top-k is needed: an all-reduce MAX of the row max, [N]);
  2. one all-reduce SUM of packed per-token partial sums, [N, <=8] fp32.
Kept for backward: the logits themselves (no copy) and O(N) per-token scalars. Backward recomputes
the softmax chunk by chunk and, for non-leaf logits, writes the gradient into the logits' own
storage (Megatron's cross-entropy overwrites its input already in forward); autograd's version
counter makes any later use of the overwritten logits by a saved-tensor consumer an error. Peak
memory is therefore the logits plus one chunk of fp32 temporaries.

All elementwise math is fp32 (bf16/fp16 logits are upcast one chunk at a time); the per-token
scalars (w, W, pi(K), pi(T)) are computed in float64 so that w stays finite when pi(x) rounds to 0
or 1 (the naive (1 - pi)**beta is 0**negative there). With beta = lambda_high = lambda_low = 0 the
arithmetic is Megatron-Core's cross-entropy, operation for operation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

STAT_NAMES = ("cross_entropy", "entropy", "target_prob", "top1", "topk_mass", "tail_mass")

_DEFAULT_CHUNK_ELEMENTS = 1 << 22   # 16 MiB of fp32 per temporary


@dataclass(frozen=True)
class LossSettings:
    beta: float = 0.0
    lambda_high: float = 0.0
    lambda_low: float = 0.0
    top_k: int = 100

    def __post_init__(self):
        for name in ("beta", "lambda_high", "lambda_low"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"generalized loss: {name} must be a finite number, got {v!r}")
        if self.beta < -1.0:
            raise ValueError(f"generalized loss: beta={self.beta} < -1: the target weight "
                             "pi(x)**(1-(1-pi(x))**beta) grows without bound as pi(x) -> 1; use beta >= -1")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 1:
            raise ValueError(f"generalized loss: top_k must be an integer >= 1, got {self.top_k!r}")

    @property
    def is_cross_entropy(self) -> bool:
        return self.beta == 0 and self.lambda_high == 0 and self.lambda_low == 0

    @property
    def has_lambda(self) -> bool:
        return self.lambda_high != 0 or self.lambda_low != 0


@dataclass(frozen=True)
class _Shard:
    """Where this rank's slice sits in the (padded) global vocabulary."""
    group: Optional[object]
    rank: int
    world: int
    local_size: int          # V/TP, padded entries included
    vocab_size: int          # real vocabulary; ids >= vocab_size are Megatron padding

    @property
    def start(self) -> int:
        return self.rank * self.local_size

    def n_real(self, rank: Optional[int] = None) -> int:
        r = self.rank if rank is None else rank
        return max(0, min(self.local_size, self.vocab_size - r * self.local_size))


def _resolve_group(tp_group):
    if tp_group is None:
        try:
            from megatron.core import parallel_state
            if parallel_state.model_parallel_is_initialized():
                tp_group = parallel_state.get_tensor_model_parallel_group()
        except ImportError:
            tp_group = None
    if tp_group is None:
        return None, 0, 1
    return tp_group, torch.distributed.get_rank(tp_group), torch.distributed.get_world_size(tp_group)


def compute_dtype(z: torch.Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 logits; float64 logits (reference tests) keep float64."""
    return torch.float64 if z.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Elementwise passes over the logits. The torch versions below are the reference; the Triton
# kernels in `triton_kernels.py` implement the same two functions for CUDA.
# ---------------------------------------------------------------------------------------------

class _Workspace:
    """Chunk-sized scratch tensors allocated once per call and reused for every chunk: a fresh
    multi-MiB tensor per chunk costs page faults (CPU) or allocator traffic that rivals the math."""

    def __init__(self, rows: int, v: int, device: torch.device):
        self.rows, self.v, self.device, self.bufs = rows, v, device, {}

    def get(self, name: str, dtype: torch.dtype, rows: int, cols: Optional[int] = None) -> torch.Tensor:
        buf = self.bufs.get((name, dtype))
        if buf is None:
            buf = self.bufs[(name, dtype)] = torch.empty(self.rows, self.v, dtype=dtype, device=self.device)
        return buf[:rows, :cols] if cols is not None else buf[:rows]


def _chunk_rows(n: int, v: int, chunk_tokens: Optional[int]) -> int:
    return max(1, min(n, chunk_tokens or max(1, _DEFAULT_CHUNK_ELEMENTS // max(1, v))))


def _chunks(n: int, v: int, chunk_tokens: Optional[int]):
    """Row slices of at most `_chunk_rows` tokens covering [0, n)."""
    step = _chunk_rows(n, v, chunk_tokens)
    for lo in range(0, n, step):
        yield slice(lo, min(n, lo + step))


def row_sums_torch(z: torch.Tensor, m: torch.Tensor, x_local: torch.Tensor, t: Optional[torch.Tensor],
                   *, n_real: int, zero_target: bool, want_entropy: bool,
                   chunk_tokens: Optional[int] = None) -> torch.Tensor:
    """Per-row partial sums of one shard: returns [N, 7] (compute dtype) with columns

    0 sum_e    sum_j exp(z_j - m) over the shard (the target's term left out when zero_target)
    1 e_x      exp(z_x - m) on the row's owner shard, else 0
    2 zx_m     z_x - m on the owner, else 0
    3 zx       z_x on the owner, else 0
    4 pad_e    sum of exp(z_j - m) over padded entries (j >= n_real)
    5 ent_dot  sum_j exp(z_j - m) * (z_j - m), target included (0 unless want_entropy)
    6 eq_before_x  on the owner: number of real entries with z == t before x in the shard (0 if t is None)
    """
    n, v = z.shape
    cd = compute_dtype(z)
    out = torch.zeros(n, 7, dtype=cd, device=z.device)
    if n == 0:
        return out
    ws = _Workspace(_chunk_rows(n, v, chunk_tokens), v, z.device)
    for rows in _chunks(n, v, chunk_tokens):
        lo, c = rows.start, rows.stop - rows.start
        zc = z[rows]
        xl = x_local[rows]
        own = xl >= 0
        idx = xl.clamp(min=0)[:, None]
        zx = torch.where(own, zc.gather(1, idx)[:, 0].to(cd), 0.0)
        d = ws.get("d", cd, c)
        torch.sub(zc, m[rows, None], out=d)                # == z.float() - m, rounded once
        zx_m = torch.where(own, d.gather(1, idx)[:, 0], 0.0)
        if t is not None:
            tr = t[rows]
            tie = own & (zx == tr) & (xl > 0)
            if bool(tie.any()):
                sel = tie.nonzero()[:, 0]
                before = torch.arange(v, device=z.device)[None, :] < xl[sel, None]
                eq = (zc[sel, :n_real].to(cd) == tr[sel, None]) & before[:, :n_real]
                out[lo + sel, 6] = eq.sum(-1).to(cd)
        if want_entropy:
            e = ws.get("e", cd, c)
            torch.exp(d, out=e)
            ed = ws.get("ed", cd, c)
            out[rows, 5] = torch.mul(e, d, out=ed).sum(-1)
        else:
            e = d.exp_()
        e_x = torch.where(own, e.gather(1, idx)[:, 0], 0.0)
        if zero_target:
            r_own = own.nonzero()[:, 0]
            e[r_own, xl[r_own]] = 0.0
        out[rows, 0] = e.sum(dim=-1)
        out[rows, 1] = e_x
        out[rows, 2] = zx_m
        out[rows, 3] = zx
        if n_real < v:
            out[rows, 4] = e[:, n_real:].sum(-1)
    return out


def _lowest_ties(zr: torch.Tensor, tr: torch.Tensor, quota: torch.Tensor) -> torch.Tensor:
    """[r, V] bool: per row the first `quota` entries equal to `tr`, in index order."""
    eq = zr == tr[:, None]
    return eq & (eq.cumsum(-1, dtype=torch.int32) <= quota[:, None])


def write_grad_torch(z: torch.Tensor, out: torch.Tensor, m: torch.Tensor, s: torch.Tensor, big_w: torch.Tensor,
                     w: torch.Tensor, g: torch.Tensor, x_local: torch.Tensor, *, n_real: int,
                     lambda_high: float, lambda_low: float, t: Optional[torch.Tensor],
                     q_local: Optional[torch.Tensor], partial: Optional[torch.Tensor],
                     chunk_tokens: Optional[int] = None) -> None:
    """out[i, j] = g_i * (pi_ij * (W_i - lam_ij) - w_i * 1[j = x_i]), pi recomputed from z, m, s.

    lam_ij = lambda_high for real j in the row's top-k set, lambda_low for the other real j, and 0
    for j = x_i and padded j. The top-k set on this shard is {z > t} plus the first q_local entries
    equal to t (in index order); `partial` marks rows where that prefix rule is needed (else all
    ties are in). `out` may be `z` itself (in-place: each chunk is read before it is written).
    Operation order: pi = exp(z - m) / s; pi *= (W - lam); pi[x] = pi_x * W - w; pi *= g.
    """
    n, v = z.shape
    if n == 0:
        return
    cd = compute_dtype(z)
    use_lam = lambda_high != 0 or lambda_low != 0
    split = use_lam and lambda_high != lambda_low
    unit_w = not use_lam and bool((big_w == 1).all())      # cross-entropy: skip the multiply by 1
    if split:
        # one comparison per element: ties wholly inside K compare against the next float below t
        full = (q_local > 0) & ~partial
        t_cmp = torch.where(full, torch.nextafter(t, torch.full_like(t, -math.inf)), t)
        coef_k = (big_w - lambda_high)[:, None]
        coef_t = (big_w - lambda_low)[:, None]
    ws = _Workspace(_chunk_rows(n, v, chunk_tokens), v, z.device)
    for rows in _chunks(n, v, chunk_tokens):
        c = rows.stop - rows.start
        zc = z[rows]
        pi = ws.get("pi", cd, c)
        torch.sub(zc, m[rows, None], out=pi)
        pi.exp_()
        pi.div_(s[rows, None])
        xl = x_local[rows]
        r_own = (xl >= 0).nonzero()[:, 0]
        x_own = xl[r_own]
        px = pi[r_own, x_own]
        wr = big_w[rows]
        if split:
            zr = zc[:, :n_real]
            in_k = ws.get("mask", torch.bool, c, n_real)
            maybe = partial[rows]
            tc = t_cmp[rows]
            part = None
            if bool(maybe.any()):
                # rows whose ties may continue past the window: count them; if the quota takes them all,
                # compare against the float below t, else take the lowest-id ones (cumsum, rare)
                eqm = ws.get("eq", torch.bool, c, n_real)
                torch.eq(zr, t[rows, None], out=eqm)
                cnt = eqm.sum(-1)
                ql = q_local[rows]
                all_in = maybe & (cnt <= ql)
                tc = torch.where(all_in, torch.nextafter(t[rows], torch.full_like(tc, -math.inf)), tc)
                part = (maybe & (cnt > ql)).nonzero()[:, 0]
            torch.gt(zr, tc[:, None], out=in_k)
            if part is not None and part.numel():
                in_k[part] |= _lowest_ties(zr[part].to(cd), t[rows][part], q_local[rows][part])
            coef = ws.get("coef", cd, c, n_real)
            torch.where(in_k, coef_k[rows], coef_t[rows], out=coef)
            pi[:, :n_real].mul_(coef)
            if n_real < v:
                pi[:, n_real:].mul_(wr[:, None])
        elif use_lam:
            pi[:, :n_real].mul_((wr - lambda_high)[:, None])
            if n_real < v:
                pi[:, n_real:].mul_(wr[:, None])
        elif not unit_w:
            pi.mul_(wr[:, None])
        pi[r_own, x_own] = px * wr[r_own] - w[rows][r_own]
        pi.mul_(g[rows, None])
        out[rows] = pi


# ---------------------------------------------------------------------------------------------
# Global top-k plan from the gathered windows
# ---------------------------------------------------------------------------------------------

_TOPK_GROUPS = 32   # group size of the top-k prefilter


def _topk_values(z: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest values of each row (descending), via a group-max prefilter.

    Columns are dealt into nb = V // 32 groups {b, b + nb, b + 2 nb, ...} (strided, so the group
    max is one vectorised max over 32 rows of length nb). The k groups with the largest maxima hold
    k values (their maxima) >= every value outside them, so the row's top-k multiset of values is
    the top-k of those 32 k candidates (plus the ragged tail): a cheap max pass and a small top-k
    instead of a top-k over the whole row (1.7x faster on CPU at 152k columns).
    """
    c, v = z.shape
    nb = v // _TOPK_GROUPS
    if nb <= 4 * k or v < 65536:   # measured on CPU: no gain at 32k columns, 1.7x at 152k
        return torch.topk(z, k, dim=-1, sorted=True).values
    main = z[:, :nb * _TOPK_GROUPS].unflatten(1, (_TOPK_GROUPS, nb))
    groups = torch.topk(main.amax(1), k, dim=-1, sorted=False).indices              # [c, k]
    offsets = nb * torch.arange(_TOPK_GROUPS, device=z.device)
    cand = z.gather(1, (groups[:, None, :] + offsets[None, :, None]).flatten(1))
    if nb * _TOPK_GROUPS < v:
        cand = torch.cat([cand, z[:, nb * _TOPK_GROUPS:]], dim=1)
    return torch.topk(cand, k, dim=-1, sorted=True).values


def _local_window(z: torch.Tensor, k_loc: int, n_real: int, chunk_tokens) -> torch.Tensor:
    """[N, k_loc + 2]: this shard's k_loc largest real logits (descending, -inf filled when the shard
    has fewer real entries), then its (k_loc+1)-th largest real logit (tells whether ties at the
    threshold may continue past the window), then the max of its padded entries (-inf if none)."""
    n, v = z.shape
    win = torch.full((n, k_loc + 2), -math.inf, dtype=compute_dtype(z), device=z.device)
    kk = min(k_loc + 1, n_real)
    for rows in _chunks(n, v, chunk_tokens):
        if kk > 0:
            win[rows, :kk] = _topk_values(z[rows, :n_real], kk)
        if n_real < v:
            win[rows, k_loc + 1] = z[rows, n_real:].amax(-1)
    return win


def _topk_plan(gathered: torch.Tensor, shard: _Shard, k_eff: int, k_loc: int):
    """From all ranks' windows [world, N, k_loc+1]: global max m, threshold t, per-rank tie quota.

    Exactness: a rank holds fewer than k_eff logits above t, so they are all in its window. The
    tie quota q_r = clamp(need - ties on lower ranks, 0, ties on r) only depends on tie counts up to
    `need`; a window truncates its tie count only when it is full of ties, i.e. holds >= need of
    them, so window counts give the exact quota.
    """
    world, n, _ = gathered.shape
    vals = gathered[:, :, :k_loc]
    m = gathered.amax(dim=(0, 2))
    valid_counts = torch.tensor([min(k_loc, shard.n_real(r)) for r in range(world)], device=vals.device)
    valid = torch.arange(k_loc, device=vals.device)[None, None, :] < valid_counts[:, None, None]
    flat = torch.where(valid, vals, -math.inf).permute(1, 0, 2).reshape(n, world * k_loc)
    t = torch.topk(flat, k_eff, dim=-1, sorted=True).values[:, -1]
    top1 = flat.amax(-1)
    gt = ((vals > t[None, :, None]) & valid).sum(-1)             # [world, N]
    eq = ((vals == t[None, :, None]) & valid).sum(-1)
    need = k_eff - gt.sum(0)                                      # [N]
    prefix = eq.cumsum(0) - eq
    quota = torch.minimum((need[None, :] - prefix).clamp(min=0), eq)
    r = shard.rank
    more_ties = gathered[r, :, k_loc] == t      # the next local value ties too: the count may be short
    partial = (quota[r] > 0) & ((quota[r] < eq[r]) | more_ties)
    return m, t, top1, quota[r], partial, gt[r]


def _all_gather(x: torch.Tensor, shard: _Shard) -> torch.Tensor:
    if shard.world == 1:
        return x[None]
    parts = [torch.empty_like(x) for _ in range(shard.world)]
    torch.distributed.all_gather(parts, x.contiguous(), group=shard.group)
    return torch.stack(parts)


def _all_reduce(x: torch.Tensor, shard: _Shard, op=None) -> torch.Tensor:
    if shard.world > 1:
        torch.distributed.all_reduce(x, op=op or torch.distributed.ReduceOp.SUM, group=shard.group)
    return x


# ---------------------------------------------------------------------------------------------
# Per-token scalars (float64)
# ---------------------------------------------------------------------------------------------

def _target_weight(lp: torch.Tensor, s_ex: torch.Tensor, s: torch.Tensor, beta: float) -> torch.Tensor:
    """w = pi**(1 - (1 - pi)**beta) from log pi and the non-target mass, in float64, finite everywhere.

    log w = (1 - (1 - pi)**beta) * log pi, with log pi and log(1 - pi) each taken from whichever of
    pi, 1 - pi is the smaller (so neither cancels); at 1 - pi == 0 exactly the limit is w = 1 for
    beta > -1 and w = e for beta = -1.
    """
    p = lp.exp()
    u = s_ex / s
    small_p = p < 0.5
    log_p = torch.where(small_p, lp, torch.log1p(-u))
    log_u = torch.where(small_p, torch.log1p(-p), torch.log(u))
    log_w = -torch.expm1(beta * log_u) * log_p
    limit = 1.0 if beta == -1.0 else 0.0
    return torch.where(u <= 0, torch.full_like(log_w, limit), log_w).exp()


class _GeneralizedLoss(torch.autograd.Function):

    @staticmethod
    def forward(ctx, logits, target, settings: LossSettings, shard: _Shard, impl: str, want_stats: bool,
                inplace: bool, chunk_tokens):
        v = shard.local_size
        z = logits.view(-1, v)
        cd = compute_dtype(z)
        tgt = target.reshape(-1).to(device=z.device, dtype=torch.long)
        n = z.shape[0]
        n_real = shard.n_real()
        valid = tgt >= 0
        own = (tgt >= shard.start) & (tgt < shard.start + v)
        x_local = torch.where(own, tgt - shard.start, -1)
        ce = settings.is_cross_entropy
        split = want_stats or (settings.has_lambda and settings.lambda_high != settings.lambda_low)

        if split:
            k_eff = min(settings.top_k, shard.vocab_size)
            k_loc = min(k_eff, v)
            gathered = _all_gather(_local_window(z, k_loc, n_real, chunk_tokens), shard)
            m, t, top1_val, q_local, partial, gt_local = _topk_plan(gathered, shard, k_eff, k_loc)
            win = gathered[shard.rank, :, :k_loc]
            above = torch.where(win > t[:, None], torch.exp(win - m[:, None]), 0.0).sum(-1)
            e_k_local = above + q_local.to(m.dtype) * torch.exp(t - m)
        else:
            m = torch.empty(n, dtype=compute_dtype(z), device=z.device)
            for rows in _chunks(n, v, chunk_tokens):
                m[rows] = z[rows].amax(-1)
            _all_reduce(m, shard, torch.distributed.ReduceOp.MAX)
            t = q_local = partial = top1_val = e_k_local = None

        row_sums = _row_sums_impl(impl)
        sums = row_sums(z, m, x_local, t, n_real=n_real, zero_target=not ce, want_entropy=want_stats,
                        chunk_tokens=chunk_tokens)
        pack = sums[:, :6]
        if split:
            own_tie_in = sums[:, 6] < q_local.to(sums.dtype)
            x_in_k = own & ((sums[:, 3] > t) | ((sums[:, 3] == t) & own_tie_in))
            pack = torch.cat([pack, e_k_local[:, None], x_in_k.to(sums.dtype)[:, None]], dim=1)
        pack = _all_reduce(pack.contiguous(), shard)
        sum_e, e_x, zx_m, zx, pad_e, ent_dot = pack[:, :6].unbind(1)

        if ce:
            s32 = sum_e
            loss32 = torch.log(s32) - zx_m
            w = big_w = None
        else:
            s_ex = sum_e.double()
            s = s_ex + e_x.double()
            s32 = s.to(cd)
            lp = zx_m.double() - torch.log(s)
            w = _target_weight(lp, s_ex, s, settings.beta) if settings.beta != 0 else torch.ones_like(lp)
            real_ex = (s_ex - pad_e.double()).clamp(min=0)
            if split:
                e_k_ex = (pack[:, 6].double() - pack[:, 7].double() * e_x.double()).clamp(min=0)
                p_k = e_k_ex / s
                p_t = (real_ex - e_k_ex).clamp(min=0) / s
            else:
                p_k = real_ex / s        # lambda_high == lambda_low: only their sum matters
                p_t = torch.zeros_like(p_k)
            loss64 = -w * lp - settings.lambda_high * p_k - settings.lambda_low * p_t
            big_w = (w + settings.lambda_high * p_k + settings.lambda_low * p_t)
            loss32 = loss64.to(cd)
            # ignored tokens' numbers are meaningless (even NaN): zero them so 0 * NaN never reaches a gradient
            w = torch.where(valid, w, 0.0).to(cd)
            big_w = torch.where(valid, big_w, 0.0).to(cd)
        loss32 = torch.where(valid, loss32, 0.0)

        stats = torch.empty(0, device=z.device)
        if want_stats:
            s64 = sum_e.double() + (0.0 if ce else e_x.double())
            ce_val = torch.log(s64) - zx_m.double()
            real_mass = (s64 - pad_e.double()) / s64
            topk_mass = pack[:, 6].double() / s64
            stats = torch.stack([
                ce_val, torch.log(s64) - ent_dot.double() / s64, torch.exp(-ce_val),
                (zx >= top1_val).double(), topk_mass, (real_mass - topk_mass).clamp(min=0)], dim=1).float()
            stats = torch.where(valid[:, None], stats, math.nan)

        g_mask = valid
        ctx.save_for_backward(logits, m, s32, x_local, g_mask,
                              *(() if ce else (w, big_w)),
                              *((t, q_local, partial) if split else ()))
        ctx.cfg = (settings, shard, impl, inplace, chunk_tokens, ce, split, n_real)
        ctx.mark_non_differentiable(stats)
        return loss32.view(target.shape), stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        settings, shard, impl, inplace, chunk_tokens, ce, split, n_real = ctx.cfg
        saved = list(ctx.saved_tensors)
        logits, m, s32, x_local, g_mask = saved[:5]
        rest = saved[5:]
        if ce:
            w = big_w = None
        else:
            w, big_w, rest = rest[0], rest[1], rest[2:]
        t, q_local, partial = rest if split else (None, None, None)
        z = logits.view(-1, shard.local_size)
        g = torch.where(g_mask, grad_loss.reshape(-1).to(m.dtype), 0.0)
        if ce:
            ones = torch.ones_like(g)
            w, big_w = ones, ones
        in_place = inplace and not logits.is_leaf
        out = z if in_place else torch.empty_like(z)
        lam_h, lam_l = (0.0, 0.0) if ce else (settings.lambda_high, settings.lambda_low)
        _write_grad_impl(impl)(z, out, m, s32, big_w, w, g, x_local, n_real=n_real, lambda_high=lam_h,
                               lambda_low=lam_l, t=t, q_local=q_local, partial=partial, chunk_tokens=chunk_tokens)
        if in_place and impl == "triton":
            torch.autograd.graph.increment_version(logits)
        return out.view(logits.shape), None, None, None, None, None, None, None


def _row_sums_impl(impl: str):
    if impl == "triton":
        from megatron_rpt.loss import triton_kernels
        return triton_kernels.row_sums_triton
    return row_sums_torch


def _write_grad_impl(impl: str):
    if impl == "triton":
        from megatron_rpt.loss import triton_kernels
        return triton_kernels.write_grad_triton
    return write_grad_torch


def _resolve_impl(impl: str, logits: torch.Tensor) -> str:
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"generalized loss: impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    if impl == "auto":
        if not logits.is_cuda or logits.dtype == torch.float64:   # the kernels are fp32-only
            return "torch"
        from megatron_rpt.loss import triton_kernels
        return "triton" if triton_kernels.available() else "torch"
    return impl


def generalized_vocab_parallel_loss(vocab_parallel_logits: torch.Tensor, target: torch.Tensor, *,
                                    beta: float = 0.0, lambda_high: float = 0.0, lambda_low: float = 0.0,
                                    top_k: int = 100, tp_group=None, vocab_size: Optional[int] = None,
                                    stats: Optional[dict] = None, impl: str = "auto",
                                    inplace_backward: bool = True,
                                    chunk_tokens: Optional[int] = None) -> torch.Tensor:
    """Per-token generalized loss [s, b] from vocab-parallel logits [s, b, V/TP] (any leading shape).

    Args:
        vocab_parallel_logits: this rank's vocabulary shard (Megatron layout: rank r holds ids
            [r * V/TP, (r+1) * V/TP)), any float dtype; math is fp32.
        target: global token ids, shape = logits.shape[:-1]. Negative ids are ignored (loss 0, no
            gradient, stats NaN); ids >= vocab_size are an error (checked for CPU tensors).
        beta, lambda_high, lambda_low, top_k: the paper's beta, lambda-tilde, lambda-hat and k.
        tp_group: tensor-parallel group; None = Megatron's when initialised, else a single shard.
        vocab_size: the real (unpadded) vocabulary; entries >= it are padding, excluded from K and
            the tail. None = no padding.
        stats: if a dict is given, it receives detached per-token fp32 tensors named
            `STAT_NAMES` (cross_entropy, entropy, target_prob, top1, topk_mass, tail_mass). top1
            counts ties with the largest logit as hits. Requesting stats adds a top-k pass.
        impl: "auto" (Triton on CUDA when available, else torch), "torch" or "triton".
        inplace_backward: let backward write the gradient into the logits' storage when the
            logits are not a leaf (the memory behaviour of Megatron's cross-entropy).
        chunk_tokens: tokens per chunk of the torch path (default: 16 MiB of fp32 per temporary).
    """
    settings = LossSettings(float(beta), float(lambda_high), float(lambda_low), top_k)
    logits = vocab_parallel_logits
    if not torch.is_tensor(logits) or not logits.is_floating_point() or logits.dim() < 1:
        raise ValueError("generalized loss: vocab_parallel_logits must be a floating-point tensor [..., V/TP]")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"generalized loss: target shape {tuple(target.shape)} does not match logits "
                         f"{tuple(logits.shape)} without the vocabulary dimension")
    if target.is_floating_point() or target.is_complex():
        raise ValueError(f"generalized loss: target must hold integer token ids, got {target.dtype}")
    group, rank, world = _resolve_group(tp_group)
    local = logits.shape[-1]
    if local < 1:
        raise ValueError("generalized loss: empty vocabulary shard")
    vocab = local * world if vocab_size is None else int(vocab_size)
    if not 1 <= vocab <= local * world:
        raise ValueError(f"generalized loss: vocab_size={vocab} outside [1, {local * world}] "
                         f"(padded vocabulary = {local} per rank x {world} ranks)")
    if not target.is_cuda and target.numel():
        bad = target >= vocab
        if bool(bad.any()):
            pos = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(f"generalized loss: target id {int(target[pos])} at position {pos} is outside "
                             f"the vocabulary [0, {vocab})")
    shard = _Shard(group, rank, world, local, vocab)
    impl = _resolve_impl(impl, logits)
    if not logits.is_contiguous():
        logits = logits.contiguous()
    loss, st = _GeneralizedLoss.apply(logits, target, settings, shard, impl, stats is not None,
                                      inplace_backward, chunk_tokens)
    if stats is not None:
        for i, name in enumerate(STAT_NAMES):
            stats[name] = st[:, i].view(target.shape)
    return loss
