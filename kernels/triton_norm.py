"""RMSNorm and fused residual-add + RMSNorm in Triton, with the reference's (HF's) numerics.

One program normalises one row. Statistics are fp32; the normalised row is rounded to the input's dtype
before the weight multiplies it, and the residual sum is rounded to its dtype before it is normalised,
exactly as ``reference.rms_norm`` / ``reference.fused_add_rms_norm`` do, so greedy outputs match HF's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    n_cols, inner, eps,
    stride_xa, stride_xb, stride_ra, stride_rb,
    BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0)
    # Rows are indexed as (a, b) so a [tokens, heads, head_dim] view of a fused qkv needs no copy.
    a = (row // inner).to(tl.int64)
    b = row % inner
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + a * stride_xa + b * stride_xb + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + a * stride_ra + b * stride_rb + cols, mask=mask, other=0.0)
        summed = (x + r.to(tl.float32)).to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row.to(tl.int64) * n_cols + cols, summed, mask=mask)
        x = summed.to(tl.float32)
        norm_dtype = residual_out_ptr.dtype.element_ty
    else:
        norm_dtype = x_ptr.dtype.element_ty
    variance = tl.sum(x * x, 0) / n_cols
    normed = (x * tl.math.rsqrt(variance + eps)).to(norm_dtype)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = w * normed.to(tl.float32)
    tl.store(out_ptr + row.to(tl.int64) * n_cols + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """``t`` as (a, b) rows of its last dimension without copying where its strides allow."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    if t.dim() == 1:
        return t, 1, 0, 0
    if t.dim() == 2:
        return t, 1, t.stride(0), 0
    if t.dim() > 3:
        t = t.reshape(-1, t.shape[-2], t.shape[-1])
    return t, t.shape[1], t.stride(0), t.stride(1)


def _launch(x, residual, weight, eps):
    n_cols = x.shape[-1]
    if weight.shape != (n_cols,):
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({n_cols},)")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual has shape {tuple(residual.shape)}, x has {tuple(x.shape)}")
    norm_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, norm_dtype), device=x.device)
    residual_out = torch.empty(x.shape, dtype=norm_dtype, device=x.device) if residual is not None else None
    num_rows = x.numel() // n_cols if n_cols else 0
    if num_rows == 0:
        return out, residual_out
    xr, inner, sxa, sxb = _rows(x)
    if residual is not None:
        rr, _, sra, srb = _rows(residual)  # same shape as x, so the same (a, b) split
    else:
        rr, sra, srb = xr, 0, 0
    block = triton.next_power_of_2(n_cols)
    num_warps = 4 if block <= 1024 else (8 if block <= 8192 else 16)
    _rms_norm_kernel[(num_rows,)](
        xr, rr, weight, out, residual_out if residual_out is not None else out,
        n_cols, inner, float(eps), sxa, sxb, sra, srb,
        BLOCK=block, HAS_RESIDUAL=residual is not None, num_warps=num_warps,
        enable_fp_fusion=False,  # keep every rounding of the reference (see triton_pointwise.py)
    )
    return out, residual_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm over the last dimension; see ``reference.rms_norm``."""
    out, _ = _launch(x, None, weight, eps)
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual = x + residual``; returns ``(rms_norm(residual), residual)`` in one pass over both inputs.

    Like the reference, the inputs are left untouched and the new residual is a fresh tensor.
    """
    return _launch(x, residual, weight, eps)


__all__ = ["rms_norm", "fused_add_rms_norm"]
