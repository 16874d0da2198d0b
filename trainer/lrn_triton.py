"""The GPU implementation of ``alexnet::lrn`` (lrn.py): one Triton kernel per direction.

Each program takes a tile of BLOCK_P pixels (n, h, w flattened) by BLOCK_C maps. The window's
neighbours are loaded from memory at shifted channel offsets, masked to the map's own block of
``group`` maps, so the tile needs no exchange between channels; the shifted loads hit the cache and
each activation-sized tensor crosses DRAM once. Any layout whose h and w merge into one pixel stride
(contiguous NCHW and channels_last both) is read in place through its strides, and the output takes
the input's layout. Values are loaded in the activation's dtype, widened to float32, and the result
is narrowed once when stored.

Backward, with D[i] = k + alpha * sum_{j in window(i)} a[j]^2 and the window symmetric in its block:

    dL/da[j] = g[j] * D[j]^-beta - 2 * alpha * beta * a[j] * sum_{i in window(j)} g[i] * a[i] * D[i]^(-beta-1)

D is recomputed from a (saving it would cost a float32 tensor written and read back).

Importing this module imports triton. Tests run the kernels on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1`` set before triton is imported; tests/test_lrn_triton.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_P = 64  # pixels per program
BLOCK_C = 32  # maps per program


@triton.jit
def _power(base, exponent):
    """base ** exponent for base > 0, in float32."""
    return tl.exp2(exponent * tl.log2(base))


@triton.jit
def _offsets(pid_p, pid_c, P, C, HW, stride_n, stride_pix, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """The tile's pixel offsets (elements), its maps, and the pixels' mask."""
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    pixel = (p // HW) * stride_n + (p % HW) * stride_pix
    return pixel, c, p < P


@triton.jit
def _neighbour(ptr, pixel, c, p_ok, d, C, group, stride_c):
    """Map c + d of each pixel in float32: 0 outside the map's block (or past the last map)."""
    j = c + d
    ok = (c < C) & (j >= 0) & (j < C) & (j // group == c // group)
    mask = p_ok[:, None] & ok[None, :]
    return tl.load(ptr + pixel[:, None] + j[None, :] * stride_c, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _lrn_fwd(
    x_ptr,
    y_ptr,
    P,
    C,
    HW,
    stride_n,
    stride_pix,
    stride_c,
    group,
    alpha,
    beta,
    k,
    HALF: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pixel, c, p_ok = _offsets(tl.program_id(0), tl.program_id(1), P, C, HW, stride_n, stride_pix, BLOCK_P, BLOCK_C)
    total = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for d in tl.static_range(-HALF, HALF + 1):
        v = _neighbour(x_ptr, pixel, c, p_ok, d, C, group, stride_c)
        total += v * v
    a = _neighbour(x_ptr, pixel, c, p_ok, 0, C, group, stride_c)
    y = a * _power(k + alpha * total, -beta)
    mask = p_ok[:, None] & (c < C)[None, :]
    offsets = pixel[:, None] + c[None, :] * stride_c
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lrn_bwd(
    x_ptr,
    g_ptr,
    dx_ptr,
    P,
    C,
    HW,
    stride_n,
    stride_pix,
    stride_c,
    gstride_n,
    gstride_pix,
    gstride_c,
    group,
    alpha,
    beta,
    k,
    HALF: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_p, pid_c = tl.program_id(0), tl.program_id(1)
    pixel, c, p_ok = _offsets(pid_p, pid_c, P, C, HW, stride_n, stride_pix, BLOCK_P, BLOCK_C)
    gpixel, c, p_ok = _offsets(pid_p, pid_c, P, C, HW, gstride_n, gstride_pix, BLOCK_P, BLOCK_C)
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)  # sum_i g[i] a[i] D[i]^(-beta-1)
    own = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)  # g[j] D[j]^-beta
    for d in tl.static_range(-HALF, HALF + 1):
        total = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        for e in tl.static_range(-HALF, HALF + 1):
            v = _neighbour(x_ptr, pixel, c, p_ok, d + e, C, group, stride_c)
            total += v * v
        base = k + alpha * total  # D[j + d] (only where j + d is in j's block; else g_i = 0 below)
        g_i = _neighbour(g_ptr, gpixel, c, p_ok, d, C, group, gstride_c)
        a_i = _neighbour(x_ptr, pixel, c, p_ok, d, C, group, stride_c)
        scaled = g_i * _power(base, -beta)
        acc += scaled * a_i / base
        if d == 0:
            own = scaled
    a = _neighbour(x_ptr, pixel, c, p_ok, 0, C, group, stride_c)
    dx = own - 2.0 * alpha * beta * a * acc
    mask = p_ok[:, None] & (c < C)[None, :]
    tl.store(dx_ptr + pixel[:, None] + c[None, :] * stride_c, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _geometry(t: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    """t (a contiguous copy unless it is contiguous or channels_last) and its (n, pixel, channel)
    strides: in both layouts h and w merge into one pixel stride, the stride of w (of h when w is 1)."""
    if not (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)):
        t = t.contiguous()
    sn, sc, sh, sw = t.stride()
    return t, (sn, sw if t.shape[3] > 1 else sh, sc)


def _grid(x: Tensor) -> tuple[int, int]:
    n, c, h, w = x.shape
    return triton.cdiv(n * h * w, BLOCK_P), triton.cdiv(c, BLOCK_C)


def lrn_forward(x: Tensor, size: int, alpha: float, beta: float, k: float, group: int) -> Tensor:
    """y = lrn(x) by the forward kernel; y has x's dtype and memory format."""
    x, (sn, sp, sc) = _geometry(x)
    y = torch.empty_like(x)
    n, c, h, w = x.shape
    _lrn_fwd[_grid(x)](
        x,
        y,
        n * h * w,
        c,
        h * w,
        sn,
        sp,
        sc,
        group,
        alpha,
        beta,
        k,
        HALF=size // 2,
        BLOCK_P=BLOCK_P,
        BLOCK_C=BLOCK_C,
    )
    return y


def lrn_backward(x: Tensor, grad: Tensor, size: int, alpha: float, beta: float, k: float, group: int) -> Tensor:
    """dL/dx by the backward kernel (``grad``: dL/dy in any layout); dx has x's dtype and memory format."""
    x, (sn, sp, sc) = _geometry(x)
    grad, (gn, gp, gc) = _geometry(grad)
    dx = torch.empty_like(x)
    n, c, h, w = x.shape
    _lrn_bwd[_grid(x)](
        x,
        grad,
        dx,
        n * h * w,
        c,
        h * w,
        sn,
        sp,
        sc,
        gn,
        gp,
        gc,
        group,
        alpha,
        beta,
        k,
        HALF=size // 2,
        BLOCK_P=BLOCK_P,
        BLOCK_C=BLOCK_C,
    )
    return dx
