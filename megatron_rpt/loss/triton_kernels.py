"""Triton kernels for the two elementwise passes of the generalized loss (`generalized.py`).

This module owns `row_sums_triton` and `write_grad_triton`, drop-in CUDA versions of
`generalized.row_sums_torch` and `generalized.write_grad_torch` (same signatures, same results up to
fp32 rounding), and `available()`, which tells `impl="auto"` whether they can run.

Each kernel runs one program per row (token) and walks that row's vocabulary shard in BLOCK-wide
tiles, so nothing of size [N, V] besides the logits (and the gradient, unless written in place) is
ever materialised. Math is fp32 whatever the logits' dtype; the reductions of a row happen in a
fixed order (per-lane accumulators over the tiles, then one tree sum), so results are
deterministic. Only Triton language features present in Triton 3.6-3.9 are used (checked by
compiling both kernels for sm_80/sm_90 with Triton 3.6.0, 3.7.1 and 3.9.0).

Triton is imported lazily: importing this module never needs Triton, and the kernels are compiled
on first use, or interpreted on CPU tensors when TRITON_INTERPRET=1 was set before the process
first imported triton (how the unit tests run them without a GPU).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

_DEFAULT_BLOCK = 2048   # vocabulary columns per tile; a shard of ~50-150k columns takes 25-75 tiles


def available() -> bool:
    """True when Triton imports and a CUDA device is present. Never raises."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401

        if getattr(triton, "__megatron_rpt_stub__", False):   # the platform's P1 stand-in
            return False
        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - a broken install (e.g. missing backend libs) means "no"
        return False


@functools.lru_cache(maxsize=None)
def _kernels():
    """Define the kernels on first use, so that importing this module never needs Triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def _row_sums_kernel(z_ptr, stride_zr, stride_zc, m_ptr, x_ptr, out_ptr, V, n_real,
                         ZERO_TARGET: tl.constexpr, WANT_ENTROPY: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)   # int64: row * stride overflows int32 for big N x V
        z_row = z_ptr + row * stride_zr
        m = tl.load(m_ptr + row)
        x = tl.load(x_ptr + row)
        own = x >= 0
        # Target terms from one scalar load (same fp32 ops as the torch reference's gather).
        zx = tl.load(z_row + tl.maximum(x, 0) * stride_zc).to(tl.float32)
        zx_m = zx - m
        e_x = tl.exp(zx_m)
        acc_e = tl.zeros([BLOCK], dtype=tl.float32)
        acc_pad = tl.zeros([BLOCK], dtype=tl.float32)
        acc_ent = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inb = cols < V
            zf = tl.load(z_row + cols * stride_zc, mask=inb, other=0.0).to(tl.float32)
            d = zf - m
            e = tl.where(inb, tl.exp(d), 0.0)
            if WANT_ENTROPY:
                acc_ent += tl.where(inb, e * d, 0.0)
            if ZERO_TARGET:
                e = tl.where(cols == x, 0.0, e)   # x == -1 (not the owner) matches no column
            acc_e += e
            acc_pad += tl.where(cols >= n_real, e, 0.0)
        base = out_ptr + row * 6
        tl.store(base + 0, tl.sum(acc_e, axis=0))
        tl.store(base + 1, tl.where(own, e_x, 0.0))
        tl.store(base + 2, tl.where(own, zx_m, 0.0))
        tl.store(base + 3, tl.where(own, zx, 0.0))
        tl.store(base + 4, tl.sum(acc_pad, axis=0))
        tl.store(base + 5, tl.sum(acc_ent, axis=0))

    @triton.jit
    def _write_grad_kernel(z_ptr, stride_zr, stride_zc, out_ptr, stride_or, stride_oc,
                           m_ptr, s_ptr, bw_ptr, w_ptr, g_ptr, x_ptr, V, n_real, lambda_real,
                           BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        z_row = z_ptr + row * stride_zr
        o_row = out_ptr + row * stride_or
        m = tl.load(m_ptr + row)
        s = tl.load(s_ptr + row)
        big_w = tl.load(bw_ptr + row)
        w = tl.load(w_ptr + row)
        g = tl.load(g_ptr + row)
        x = tl.load(x_ptr + row)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inb = cols < V
            # Each tile is fully loaded before it is stored, so out may alias z (in-place backward).
            zf = tl.load(z_row + cols * stride_zc, mask=inb, other=0.0).to(tl.float32)
            # Correctly rounded division like torch's (a plain `/` may lower to div.full.f32 on CUDA).
            pi = tl.math.div_rn(tl.exp(zf - m), s)
            # lambda_low on every real non-target entry; the top-k members are rewritten afterwards
            lam = tl.where((cols < n_real) & (cols != x), lambda_real, 0.0)
            pi = pi * (big_w - lam)
            pi = tl.where(cols == x, pi - w, pi)
            pi = pi * g
            tl.store(o_row + cols * stride_oc, pi.to(o_row.dtype.element_ty), mask=inb)

    return _row_sums_kernel, _write_grad_kernel


def _check_float(z: torch.Tensor) -> None:
    if z.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"triton loss kernels take fp32/bf16/fp16 logits, got {z.dtype} "
                         "(use impl='torch' for float64)")
    if z.dim() != 2:
        raise ValueError(f"triton loss kernels take [N, V] logits, got shape {tuple(z.shape)}")


def _check_device(z: torch.Tensor, kernel) -> None:
    # Compiled kernels need CUDA tensors; the interpreter (TRITON_INTERPRET=1) takes CPU tensors.
    if not z.is_cuda and type(kernel).__name__ != "InterpretedFunction":
        raise ValueError(f"triton loss kernels need CUDA tensors, got {z.device} (use impl='torch', "
                         "or TRITON_INTERPRET=1 to interpret them on CPU)")


def _f32(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.float32).contiguous()


def _i32(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.int32).contiguous()


def _block(v: int, block_size: Optional[int]) -> int:
    import triton

    b = block_size or _DEFAULT_BLOCK
    return max(16, min(triton.next_power_of_2(b), triton.next_power_of_2(v)))


def _launch_options(block: int) -> dict:
    # No FMA contraction, so products and sums round as in the torch reference (pi * (W - lam) - w
    # stays two roundings); the kernels are memory-bound, so this costs nothing. At BLOCK 2048 and
    # 8 warps the kernels need ~60/~96 registers on sm_90, no spills.
    return dict(num_warps=8 if block >= 2048 else 4, enable_fp_fusion=False)


def row_sums_triton(z: torch.Tensor, m: torch.Tensor, x_local: torch.Tensor, *, n_real: int, zero_target: bool,
                    want_entropy: bool, block_size: Optional[int] = None) -> torch.Tensor:
    """Triton `row_sums_torch` (never overwriting z): [N, 6] fp32 per-row partial sums (see that
    docstring for the columns); block_size overrides the tile width (rounded up to a power of two)."""
    _check_float(z)
    n, v = z.shape
    out = torch.empty(n, 6, dtype=torch.float32, device=z.device)
    if n == 0:
        return out
    row_sums, _ = _kernels()
    _check_device(z, row_sums)
    block = _block(v, block_size)
    row_sums[(n,)](z, z.stride(0), z.stride(1), _f32(m), _i32(x_local), out, v, int(n_real),
                   ZERO_TARGET=bool(zero_target), WANT_ENTROPY=bool(want_entropy),
                   BLOCK=block, **_launch_options(block))
    return out


def write_grad_triton(z: torch.Tensor, out: torch.Tensor, m: torch.Tensor, s: torch.Tensor, big_w: torch.Tensor,
                      w: torch.Tensor, g: torch.Tensor, x_local: torch.Tensor, e_x: Optional[torch.Tensor] = None,
                      *, n_real: int, lambda_high: float, lambda_low: float, k_idx: Optional[torch.Tensor] = None,
                      k_mask: Optional[torch.Tensor] = None, block_size: Optional[int] = None) -> None:
    """Triton `write_grad_torch`: out = g * (pi * (W - lam) - w * 1[j = x]), written in out's dtype.

    One kernel pass gives every real non-target entry lambda_low; with lambda_high != lambda_low the
    top-k members (k_idx where k_mask, from the forward) are then rewritten by
    `generalized.scatter_topk_grad` from their logits, read before the pass. `e_x` is accepted for
    signature parity (the kernel recomputes the target's term). `out` may be `z` itself (in place;
    the caller bumps autograd's version counter, which a raw kernel store does not), or e.g. an
    fp32 tensor for bf16 logits; block_size as in row_sums_triton.
    """
    from megatron_rpt.loss.generalized import scatter_topk_grad

    _check_float(z)
    if out.shape != z.shape or out.device != z.device or not out.is_floating_point():
        raise ValueError(f"write_grad_triton: out {tuple(out.shape)} {out.dtype} {out.device} does not "
                         f"match z {tuple(z.shape)} {z.device}")
    n, v = z.shape
    if n == 0:
        return
    lambda_high, lambda_low = float(lambda_high), float(lambda_low)
    split = (lambda_high != 0 or lambda_low != 0) and lambda_high != lambda_low
    if split and (k_idx is None or k_mask is None):
        raise ValueError("write_grad_triton: lambda_high != lambda_low needs the top-k members (k_idx, k_mask)")
    _, write_grad = _kernels()
    _check_device(z, write_grad)
    z_k = z.gather(1, k_idx) if split else None     # before an in-place pass overwrites them
    block = _block(v, block_size)
    write_grad[(n,)](z, z.stride(0), z.stride(1), out, out.stride(0), out.stride(1),
                     _f32(m), _f32(s), _f32(big_w), _f32(w), _f32(g), _i32(x_local),
                     v, int(n_real), lambda_low if split else lambda_high,
                     BLOCK=block, **_launch_options(block))
    if split:
        scatter_topk_grad(z_k, out, k_idx, k_mask, x_local, _f32(m), _f32(s), _f32(big_w), _f32(g), lambda_high,
                          z_is_exp=False)
