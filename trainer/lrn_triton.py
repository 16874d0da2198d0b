"""The GPU implementation of ``alexnet::lrn`` and ``alexnet::lrn_backward`` (lrn.py): one Triton
kernel per direction, compiled from one source (``_lrn``, its ``BACKWARD`` a compile-time constant).

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

import contextlib

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
    p = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)  # no int32 overflow on large batches
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
def _window_sum(
    x_ptr, pixel, c, p_ok, shift, C, group, stride_c, HALF: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr
):
    """sum of a^2 over the window of map c + shift (within c's block), in float32."""
    total = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for e in tl.static_range(-HALF, HALF + 1):
        v = _neighbour(x_ptr, pixel, c, p_ok, shift + e, C, group, stride_c)
        total += v * v
    return total


@triton.jit
def _lrn(
    x_ptr,
    g_ptr,
    out_ptr,
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
    BACKWARD: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Forward (out = y; g_ptr unused) or backward (out = dx from g = dL/dy): two kernels, one source.
    All three tensors have x's strides."""
    pixel, c, p_ok = _offsets(tl.program_id(0), tl.program_id(1), P, C, HW, stride_n, stride_pix, BLOCK_P, BLOCK_C)
    a = _neighbour(x_ptr, pixel, c, p_ok, 0, C, group, stride_c)
    if BACKWARD:
        spread = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)  # sum_i g[i] a[i] D[i]^(-beta-1)
        own = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)  # g[j] D[j]^-beta
        for d in tl.static_range(-HALF, HALF + 1):
            # D[j + d]; where j + d is outside j's block g_i is 0 and the term vanishes
            base = k + alpha * _window_sum(x_ptr, pixel, c, p_ok, d, C, group, stride_c, HALF, BLOCK_P, BLOCK_C)
            g_i = _neighbour(g_ptr, pixel, c, p_ok, d, C, group, stride_c)
            scaled = g_i * _power(base, -beta)
            spread += scaled * _neighbour(x_ptr, pixel, c, p_ok, d, C, group, stride_c) / base
            if d == 0:
                own = scaled
        out = own - 2.0 * alpha * beta * a * spread
    else:
        base = k + alpha * _window_sum(x_ptr, pixel, c, p_ok, 0, C, group, stride_c, HALF, BLOCK_P, BLOCK_C)
        out = a * _power(base, -beta)
    mask = p_ok[:, None] & (c < C)[None, :]
    tl.store(out_ptr + pixel[:, None] + c[None, :] * stride_c, out.to(out_ptr.dtype.element_ty), mask=mask)


def on_device(t: Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it ``t``'s (CPU tensors: the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _geometry(t: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    """t (a contiguous copy unless it is contiguous or channels_last) and its (n, pixel, channel)
    strides: in both layouts h and w merge into one pixel stride, the stride of w (of h when w is 1)."""
    if not (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)):
        t = t.contiguous()
    sn, sc, sh, sw = t.stride()
    return t, (sn, sw if t.shape[3] > 1 else sh, sc)


def _launch(x: Tensor, grad: Tensor | None, size: int, alpha: float, beta: float, k: float, group: int) -> Tensor:
    x, (sn, sp, sc) = _geometry(x)
    if grad is not None and grad.stride() != x.stride():
        grad = torch.empty_like(x).copy_(grad)  # dL/dy in x's layout (autograd usually hands it so)
    out = torch.empty_like(x)
    n, c, h, w = x.shape
    grid = (triton.cdiv(n * h * w, BLOCK_P), triton.cdiv(c, BLOCK_C))
    args = (x, x if grad is None else grad, out, n * h * w, c, h * w, sn, sp, sc, group, alpha, beta, k)
    with on_device(x):  # the tensor's GPU, not the current one (the split form's second column)
        _lrn[grid](*args, BACKWARD=grad is not None, HALF=size // 2, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C)
    return out


def lrn_forward(x: Tensor, size: int, alpha: float, beta: float, k: float, group: int) -> Tensor:
    """y = lrn(x) by the forward kernel; y has x's dtype and memory format."""
    return _launch(x, None, size, alpha, beta, k, group)


def lrn_backward(x: Tensor, grad: Tensor, size: int, alpha: float, beta: float, k: float, group: int) -> Tensor:
    """dL/dx by the backward kernel (``grad``: dL/dy in any layout); dx has x's dtype and memory format."""
    return _launch(x, grad, size, alpha, beta, k, group)
