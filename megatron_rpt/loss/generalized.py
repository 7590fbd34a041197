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
it matters for the tie quota (see `_topk_plan`). The forward keeps each rank's members of K as
column indices ([N, <= k], `_topk_members`); the backward gives every real entry lambda_low in its
one pass and rewrites the members by scatter (O(N k)), never comparing logits again.

Collectives (tensor-parallel group; forward only, backward communicates nothing):
  1. an all-gather of each rank's local top-k logits plus the max of its padded entries, [N, k'+1]
     fp32 (when no top-k is needed: an all-reduce MAX of the row max, [N]);
  2. one all-reduce SUM of packed per-token partial sums, [N, <=8] fp32.
Kept for backward: the logits' storage (no copy), O(N) per-token scalars and the O(N k) member
indices. Memory, as Megatron's cross-entropy: with `overwrite_logits` (how the model's per-token
head calls it) fp32 logits are overwritten with exp(z - m) in forward and with the gradient in
backward, so no [N, V] temporary exists (one chunk only while entropy statistics are computed);
otherwise the logits are only read in forward, the backward recomputes exp(z - m) chunk by chunk
and, for non-leaf logits, writes the gradient into their storage (bf16/fp16 logits always take
this path: exp(z - m) in bf16 would lose the precision the fp32 math keeps). Autograd's version
counter makes any later use of overwritten logits by a saved-tensor consumer an error.

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


def row_sums_torch(z: torch.Tensor, m: torch.Tensor, x_local: torch.Tensor, *, n_real: int, zero_target: bool,
                   want_entropy: bool, overwrite: bool = False, chunk_tokens: Optional[int] = None) -> torch.Tensor:
    """Per-row partial sums of one shard: returns [N, 6] (compute dtype) with columns

    0 sum_e    sum_j exp(z_j - m) over the shard (the target's term left out when zero_target)
    1 e_x      exp(z_x - m) on the row's owner shard, else 0
    2 zx_m     z_x - m on the owner, else 0
    3 zx       z_x on the owner, else 0
    4 pad_e    sum of exp(z_j - m) over padded entries (j >= n_real)
    5 ent_dot  sum_j exp(z_j - m) * (z_j - m), target included (0 unless want_entropy)

    `overwrite` (fp32 z only): z itself receives e_j = exp(z_j - m) (0 at the target when
    zero_target), as Megatron's cross-entropy overwrites its input; no [N, V] scratch is needed
    then except one chunk of z - m when want_entropy. Otherwise z is only read.
    """
    n, v = z.shape
    cd = compute_dtype(z)
    if overwrite and z.dtype != cd:
        raise ValueError(f"row_sums_torch: overwrite needs {cd} logits, got {z.dtype}")
    out = torch.zeros(n, 6, dtype=cd, device=z.device)
    if n == 0:
        return out
    ws = _Workspace(_chunk_rows(n, v, chunk_tokens), v, z.device)
    for rows in _chunks(n, v, chunk_tokens):
        c = rows.stop - rows.start
        zc = z[rows]
        xl = x_local[rows]
        own = xl >= 0
        idx = xl.clamp(min=0)[:, None]
        zx = torch.where(own, zc.gather(1, idx)[:, 0].to(cd), 0.0)
        if overwrite and not want_entropy:
            d = zc.sub_(m[rows, None])
        else:
            d = torch.sub(zc, m[rows, None], out=ws.get("d", cd, c))    # == z.float() - m, rounded once
        zx_m = torch.where(own, d.gather(1, idx)[:, 0], 0.0)
        if want_entropy:
            e = torch.exp(d, out=zc if overwrite else ws.get("e", cd, c))
            out[rows, 5] = d.mul_(e).sum(-1)          # d is not needed after this (bmm: 3.6x slower on CPU)
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


def scatter_topk_grad(z_k: torch.Tensor, out: torch.Tensor, k_idx: torch.Tensor, k_mask: torch.Tensor,
                      x_local: torch.Tensor, m: torch.Tensor, s: torch.Tensor, big_w: torch.Tensor, g: torch.Tensor,
                      lambda_high: float, *, z_is_exp: bool) -> None:
    """out[i, k_idx[i, j]] = g_i * pi * (W_i - lambda_high) where k_mask[i, j], except at the target
    (lambda 0 there): the top-k members' gradient over a bulk pass that gave every real non-target
    entry lambda_low. `z_k` = the logits (or, with z_is_exp, exp(z - m)) at k_idx, read before the
    bulk pass overwrote them. O(N k) work, nothing of size [N, V]."""
    rows, slots = (k_mask & (k_idx != x_local[:, None])).nonzero(as_tuple=True)
    if rows.numel() == 0:
        return
    cd = m.dtype
    zk = z_k[rows, slots].to(cd)
    pi = (zk if z_is_exp else torch.exp(zk - m[rows])) / s[rows]
    out[rows, k_idx[rows, slots]] = (pi * (big_w[rows] - lambda_high) * g[rows]).to(out.dtype)


def write_grad_torch(z: torch.Tensor, out: torch.Tensor, m: torch.Tensor, s: torch.Tensor, big_w: torch.Tensor,
                     w: torch.Tensor, g: torch.Tensor, x_local: torch.Tensor, e_x: torch.Tensor, *, n_real: int,
                     lambda_high: float, lambda_low: float, k_idx: Optional[torch.Tensor] = None,
                     k_mask: Optional[torch.Tensor] = None, z_is_exp: bool = False,
                     chunk_tokens: Optional[int] = None) -> None:
    """out[i, j] = g_i * (pi_ij * (W_i - lam_ij) - w_i * 1[j = x_i]), pi = exp(z - m) / s.

    lam_ij = lambda_high for the row's top-k members on this shard (k_idx where k_mask, from the
    forward; needed only when lambda_high != lambda_low), lambda_low for the other real j, 0 for
    j = x_i and padded j. `e_x` = exp(z_x - m) of the row's target (used on its owner shard).
    `z_is_exp`: z holds exp(z - m) already (the overwriting forward), so nothing is recomputed,
    the gradient is written over it (`out` must be `z`) and the target's entry is not read.
    Otherwise `out` may be `z` itself (each chunk is read before it is written). Cross-entropy (W = w = 1, no lambda) keeps Megatron-Core's operation order
    (pi = e / s; pi[x] -= 1; pi *= g); otherwise each entry is e * (g (W - lam) / s), one multiply.
    """
    n, v = z.shape
    if n == 0:
        return
    cd = compute_dtype(z)
    use_lam = lambda_high != 0 or lambda_low != 0
    split = use_lam and lambda_high != lambda_low
    if split and (k_idx is None or k_mask is None):
        raise ValueError("write_grad_torch: lambda_high != lambda_low needs the top-k members (k_idx, k_mask)")
    if z_is_exp and (z.dtype != cd or out.data_ptr() != z.data_ptr()):
        raise ValueError(f"write_grad_torch: z_is_exp needs {cd} values written in place (out is z)")
    ce = not use_lam and bool((big_w == 1).all()) and bool((w == 1).all())
    lam_real = lambda_low if use_lam else 0.0
    coef_real = g * (big_w - lam_real) / s           # per row: real non-target entries
    coef_pad = g * big_w / s                          # padded entries (lambda 0)
    value_x = g * (e_x / s * big_w - w)               # the target (lambda 0)
    ws = _Workspace(_chunk_rows(n, v, chunk_tokens), v, z.device)
    for rows in _chunks(n, v, chunk_tokens):
        c = rows.stop - rows.start
        zc = z[rows]
        if z_is_exp:
            pi = zc
        else:
            pi = torch.sub(zc, m[rows, None], out=ws.get("pi", cd, c)).exp_()
        z_k = pi.gather(1, k_idx[rows]) if split else None     # before the bulk pass overwrites them
        xl = x_local[rows]
        r_own = (xl >= 0).nonzero()[:, 0]
        x_own = xl[r_own]
        if ce:
            pi.div_(s[rows, None])
            pi[r_own, x_own] -= 1.0
            pi.mul_(g[rows, None])
        else:
            if n_real < v and lam_real != 0.0:
                pi[:, :n_real].mul_(coef_real[rows, None])
                pi[:, n_real:].mul_(coef_pad[rows, None])
            else:
                pi.mul_(coef_real[rows, None])
            if split:
                scatter_topk_grad(z_k, pi, k_idx[rows], k_mask[rows], xl, m[rows], s[rows], big_w[rows], g[rows],
                                  lambda_high, z_is_exp=True)
            pi[r_own, x_own] = value_x[rows][r_own]
        if not z_is_exp:
            out[rows] = pi


# ---------------------------------------------------------------------------------------------
# Global top-k plan from the gathered windows
# ---------------------------------------------------------------------------------------------

def _topk_group(v: int) -> int:
    """Columns per group of the top-k prefilter (contiguous), 0 for none: measured on CPU, 64 at 152k
    columns (2.6x faster than torch.topk), 32 at 32k (1.3x), no gain below ~30k."""
    return 64 if v >= 65536 else 32 if v >= 30000 else 0


def _topk_values(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest values of each row (descending) and their column indices, via a group-max prefilter.

    Columns are split into nb = V // G contiguous groups of G (`_topk_group`). The k groups with the
    largest maxima hold k values (their maxima) >= every value outside them, so the row's top-k
    multiset of values is the top-k of those G k candidates (plus the ragged tail): one max pass
    (about as fast as a row max) and small top-ks instead of a top-k over the whole row. Among
    equal values the indices are whichever torch.topk returns (callers resolve ties themselves).
    """
    c, v = z.shape
    g = _topk_group(v)
    nb = v // g if g else 0
    if nb <= 4 * k:
        r = torch.topk(z, k, dim=-1, sorted=True)
        return r.values, r.indices
    main = z[:, :nb * g].view(c, nb, g)
    groups = torch.topk(main.amax(-1), k, dim=-1, sorted=False).indices              # [c, k]
    cols = (groups[:, :, None] * g + torch.arange(g, device=z.device)).flatten(1)
    if nb * g < v:
        tail = torch.arange(nb * g, v, device=z.device)
        cols = torch.cat([cols, tail.expand(c, -1)], dim=1)
    r = torch.topk(z.gather(1, cols), k, dim=-1, sorted=True)
    return r.values, cols.gather(1, r.indices)


def _local_window(z: torch.Tensor, k_loc: int, n_real: int, chunk_tokens) -> tuple[torch.Tensor, torch.Tensor]:
    """([N, k_loc + 2], [N, k_loc]): this shard's k_loc largest real logits (descending, -inf filled
    when the shard has fewer real entries), then its (k_loc+1)-th largest real logit (tells whether
    ties at the threshold may continue past the window), then the max of its padded entries (-inf
    if none); and the local column of each of the k_loc values (0 where -inf filled)."""
    n, v = z.shape
    win = torch.full((n, k_loc + 2), -math.inf, dtype=compute_dtype(z), device=z.device)
    idx = torch.zeros((n, k_loc), dtype=torch.long, device=z.device)
    kk = min(k_loc + 1, n_real)
    for rows in _chunks(n, v, chunk_tokens):
        if kk > 0:
            vals, cols = _topk_values(z[rows, :n_real], kk)
            win[rows, :kk] = vals
            idx[rows, :min(kk, k_loc)] = cols[:, :k_loc]
        if n_real < v:
            win[rows, k_loc + 1] = z[rows, n_real:].amax(-1)
    return win, idx


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


def _topk_members(z: torch.Tensor, win: torch.Tensor, idx: torch.Tensor, t: torch.Tensor, quota: torch.Tensor,
                  partial: torch.Tensor, n_real: int, chunk_tokens) -> tuple[torch.Tensor, torch.Tensor]:
    """This shard's members of the global top-k as (k_idx [N, k_loc] columns, k_mask [N, k_loc]);
    k_idx is `idx` (the window's columns), rewritten in place where needed.

    Members: every entry > t (all in the window) and the `quota` lowest-id entries equal to t. When
    the quota takes all of the window's ties and no tie lies beyond it (not `partial`), those are
    the window's ties. Otherwise (ties continue past the window, or only some are in) the window's
    tie slots get the lowest-id ties of the row (`_ties_in_order`; common with bf16 logits, whose
    values repeat; rare in fp32). A row's quota never exceeds its window's tie count.
    """
    k_loc = idx.shape[1]
    vals = win[:, :k_loc]
    valid = torch.arange(k_loc, device=z.device)[None, :] < min(k_loc, n_real)
    eq = (vals == t[:, None]) & valid
    tie_slot = eq & (eq.cumsum(-1, dtype=torch.int32) <= quota[:, None])
    mask = ((vals > t[:, None]) & valid) | tie_slot
    if not bool(partial.any()):
        return idx, mask
    n, v = z.shape
    for rows in _chunks(n, v, chunk_tokens):
        sel = partial[rows].nonzero()[:, 0]
        if sel.numel() == 0:
            continue
        r = rows.start + sel
        row_of, cols = _ties_in_order(z[rows], sel, t[r], n_real)
        count = torch.bincount(row_of, minlength=sel.numel())
        rank = torch.arange(row_of.numel(), device=z.device) - (count.cumsum(0) - count)[row_of]
        take = rank < quota[r][row_of]
        sub = idx[r]
        sub[tie_slot[r]] = cols[take]                   # both row-major, quota entries per row
        idx[r] = sub
    return idx, mask


def _ties_in_order(zc: torch.Tensor, sel: torch.Tensor, tr: torch.Tensor, n_real: int):
    """(row, column) of every real entry of rows `sel` of the chunk `zc` equal to that row's `tr`,
    sorted by row, then column. Only the contiguous groups whose max reaches tr can hold such an
    entry: one max pass and a few gathered groups instead of comparing and compacting whole rows."""
    g = 64                                               # any group size is exact; the prefilter's at 152k
    nb = n_real // g
    row_of = torch.empty(0, dtype=torch.long, device=zc.device)
    cols = torch.empty(0, dtype=torch.long, device=zc.device)
    tz = tr.to(zc.dtype)                                 # exact: tr is a value of these logits
    if nb:
        grouped = zc[:, :nb * g].view(zc.shape[0], nb, g)
        # few rows: copy them out; many (bf16): one max pass over the whole chunk is cheaper than the copy
        gmax = grouped[sel].amax(-1) if 2 * sel.numel() < zc.shape[0] else grouped.amax(-1)[sel]
        hits = (gmax >= tz[:, None]).nonzero()                                    # (sel row, group), sorted
        eq = (grouped[sel[hits[:, 0]], hits[:, 1]] == tz[hits[:, 0], None]).nonzero()   # (hit, offset), sorted
        row_of = hits[eq[:, 0], 0]
        cols = hits[eq[:, 0], 1] * g + eq[:, 1]
    if nb * g < n_real:                                  # the ragged tail: higher ids than every group
        tail = (zc[sel, nb * g:n_real] == tz[:, None]).nonzero()
        row_of = torch.cat([row_of, tail[:, 0]])
        cols = torch.cat([cols, tail[:, 1] + nb * g])
        order = torch.sort(row_of, stable=True).indices
        row_of, cols = row_of[order], cols[order]
    return row_of, cols


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
                inplace: bool, overwrite: bool, chunk_tokens):
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
        k_idx = k_mask = None

        if split:
            k_eff = min(settings.top_k, shard.vocab_size)
            k_loc = min(k_eff, v)
            win, widx = _local_window(z, k_loc, n_real, chunk_tokens)
            gathered = _all_gather(win, shard)
            m, t, top1_val, q_local, partial, gt_local = _topk_plan(gathered, shard, k_eff, k_loc)
            k_idx, k_mask = _topk_members(z, win, widx, t, q_local, partial, n_real, chunk_tokens)
            e_k_local = torch.where(k_mask, torch.exp(win[:, :k_loc] - m[:, None]), 0.0).sum(-1)
            x_in_k = own & ((k_idx == x_local[:, None]) & k_mask).any(-1)
        else:
            m = torch.empty(n, dtype=compute_dtype(z), device=z.device)
            for rows in _chunks(n, v, chunk_tokens):
                m[rows] = z[rows].amax(-1)
            _all_reduce(m, shard, torch.distributed.ReduceOp.MAX)
            top1_val = None

        if impl == "triton":
            from megatron_rpt.loss import triton_kernels
            sums = triton_kernels.row_sums_triton(z, m, x_local, n_real=n_real, zero_target=not ce,
                                                  want_entropy=want_stats)
        else:
            sums = row_sums_torch(z, m, x_local, n_real=n_real, zero_target=not ce, want_entropy=want_stats,
                                  overwrite=overwrite, chunk_tokens=chunk_tokens)
        pack = sums
        if split:
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

        lam_split = settings.has_lambda and settings.lambda_high != settings.lambda_low
        ctx.save_for_backward(logits, m, s32, x_local, valid, e_x,
                              *(() if ce else (w, big_w)),
                              *((k_idx, k_mask) if lam_split else ()))
        ctx.cfg = (settings, shard, impl, inplace, overwrite, chunk_tokens, ce, lam_split, n_real)
        ctx.mark_non_differentiable(stats)
        return loss32.view(target.shape), stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        settings, shard, impl, inplace, overwrite, chunk_tokens, ce, lam_split, n_real = ctx.cfg
        saved = list(ctx.saved_tensors)
        logits, m, s32, x_local, valid, e_x = saved[:6]
        rest = saved[6:]
        if ce:
            w = big_w = None
        else:
            w, big_w, rest = rest[0], rest[1], rest[2:]
        k_idx, k_mask = rest if lam_split else (None, None)
        z = logits.view(-1, shard.local_size)
        g = torch.where(valid, grad_loss.reshape(-1).to(m.dtype), 0.0)
        if ce:
            w = big_w = torch.ones_like(g)
        # the overwriting forward left exp(z - m) in the logits: write the gradient over it (its storage
        # is the loss's own by then), so no [N, V] scratch at all
        in_place = overwrite or (inplace and not logits.is_leaf)
        out = z if in_place else torch.empty_like(z)
        lam_h, lam_l = (0.0, 0.0) if ce else (settings.lambda_high, settings.lambda_low)
        if impl == "triton":
            from megatron_rpt.loss import triton_kernels
            triton_kernels.write_grad_triton(z, out, m, s32, big_w, w, g, x_local, e_x, n_real=n_real,
                                             lambda_high=lam_h, lambda_low=lam_l, k_idx=k_idx, k_mask=k_mask)
            if in_place:
                torch.autograd.graph.increment_version(logits)
        else:
            write_grad_torch(z, out, m, s32, big_w, w, g, x_local, e_x, n_real=n_real, lambda_high=lam_h,
                             lambda_low=lam_l, k_idx=k_idx, k_mask=k_mask, z_is_exp=overwrite,
                             chunk_tokens=chunk_tokens)
        return out.view(logits.shape), None, None, None, None, None, None, None, None


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
                                    inplace_backward: bool = True, overwrite_logits: bool = False,
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
            logits are not a leaf.
        overwrite_logits: the logits are the loss's to destroy (the model's output layer hands
            them over, as to Megatron's cross-entropy): fp32/float64 logits are overwritten with
            exp(z - m) in forward and with the gradient in backward, so the loss needs no [N, V]
            scratch (torch path; the Triton kernels never need any). Do not read the logits after
            the call.
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
    overwrite = bool(overwrite_logits) and impl == "torch" and logits.dtype == compute_dtype(logits)
    loss, st = _GeneralizedLoss.apply(logits, target, settings, shard, impl, stats is not None,
                                      inplace_backward, overwrite, chunk_tokens)
    if stats is not None:
        for i, name in enumerate(STAT_NAMES):
            stats[name] = st[:, i].view(target.shape)
    return loss
