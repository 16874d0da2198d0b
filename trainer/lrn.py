"""§3.3 response normalisation as one custom operator, ``torch.ops.alexnet.lrn``.

    b[i] = a[i] / (k + alpha * sum_{j in window(i)} a[j]^2) ** beta

The window holds the ``size`` maps centred on ``i`` that lie in ``i``'s block of ``group_size`` maps
(one block per column, model.py): the sum never crosses a block boundary.

Two implementations of one function:

* the CPU one (and the reference the tests hold the GPU one to) is :func:`lrn_reference` and
  :func:`lrn_reference_backward`: the windowed sum of squares as a 1x1 convolution with a band
  matrix, the denominator in float32 (float64 for a float64 input) whatever the input's dtype and
  any autocast;
* the CUDA one is two Triton kernels (lrn_triton.py), one per direction: each reads and writes the
  activation's dtype once and sums the window and takes the power in float32 registers. Under bf16
  the reference widens conv1's and conv2's activations and passes them through x^2, the band
  convolution, the power, the multiply and the narrowing, forward and backward (about 10 GB of a
  16 GB step at batch 128, benchmarks/bench_bytes.py); the kernels move 5 activation-sized bf16
  tensors in all (forward: x in, y out; backward: x and dy in, dx out).

The operator is registered with a fake (meta) implementation, so ``torch.compile`` traces it as one
opaque node, and with its autograd formula (``register_autograd``); autocast passes it by (the
activation keeps its dtype). The backward is a second operator, ``alexnet::lrn_backward``.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor

# The element bytes each direction's GPU kernel loads and stores, in activation-sized tensors: what the
# byte count of benchmarks/bench_bytes.py charges the operators.
KERNEL_TENSORS = {"lrn": 2, "lrn_backward": 3}


def check_groups(channels: int, group_size: int) -> int:
    """The block size (``group_size``, or all ``channels`` when 0); a ValueError when it does not divide."""
    group = group_size or channels
    if channels % group:
        raise ValueError(f"LocalResponseNorm: {channels} channels are not a multiple of group_size {group}")
    return group


def _band(channels: int, size: int, alpha: float, k: float, group: int, device, dtype) -> tuple[Tensor, Tensor]:
    """(alpha x the 0/1 band as a 1x1 kernel, block-diagonal, k as its bias), built on the device itself."""
    i = torch.arange(channels, device=device)
    near = (i[:, None] - i[None, :]).abs() <= size // 2
    same_block = (i[:, None] // group) == (i[None, :] // group)
    weight = (near & same_block).to(dtype).mul_(alpha).reshape(channels, channels, 1, 1)
    return weight, torch.full((channels,), k, dtype=dtype, device=device)


def _base(a: Tensor, size: int, alpha: float, k: float, group_size: int) -> tuple[Tensor, Tensor]:
    """(D = k + alpha * sum a^2 over each window, the band kernel) for a widened ``a``: one GEMM over
    the channels (the band as a 1x1 convolution, which keeps channels_last)."""
    group = check_groups(a.shape[1], group_size)
    weight, bias = _band(a.shape[1], size, alpha, k, group, a.device, a.dtype)
    return F.conv2d(a * a, weight, bias), weight


def lrn_reference(x: Tensor, size: int, alpha: float, beta: float, k: float, group_size: int) -> Tensor:
    """The reference arithmetic in float32 (float64 for float64) whatever the autocast; output in x's dtype."""
    wide = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        a = x.to(wide)
        base, _ = _base(a, size, alpha, k, group_size)
        return (a * base.pow(-beta)).to(x.dtype)


def lrn_reference_backward(
    x: Tensor, grad: Tensor, size: int, alpha: float, beta: float, k: float, group_size: int
) -> Tensor:
    """dL/dx of :func:`lrn_reference` by the same arithmetic (the band is symmetric, so the sum over
    the windows that hold j is the band convolution again):
    dx[j] = g[j] D[j]^-beta - 2 beta a[j] sum_{i in window(j)} alpha g[i] a[i] D[i]^(-beta-1)."""
    wide = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        a, g = x.to(wide), grad.to(wide)
        base, weight = _base(a, size, alpha, k, group_size)
        scaled = g * base.pow(-beta)
        spread = F.conv2d(scaled * a / base, weight)
        return (scaled - 2 * beta * a * spread).to(x.dtype)


@functools.cache
def triton_available() -> bool:
    """Whether triton can be imported (torch's CUDA wheels bring it; a build without it uses the reference)."""
    return importlib.util.find_spec("triton") is not None


def _uses_kernel(x: Tensor) -> bool:
    return x.device.type == "cuda" and x.dtype != torch.float64 and triton_available()


@torch.library.custom_op("alexnet::lrn", mutates_args=())
def lrn(x: Tensor, size: int, alpha: float, beta: float, k: float, group_size: int) -> Tensor:
    """§3.3 on (N, C, H, W) in blocks of ``group_size`` maps (0: one block); the output has x's dtype
    and memory format."""
    if _uses_kernel(x):
        from .lrn_triton import lrn_forward

        return lrn_forward(x, size, alpha, beta, k, check_groups(x.shape[1], group_size))
    return lrn_reference(x, size, alpha, beta, k, group_size)


@torch.library.custom_op("alexnet::lrn_backward", mutates_args=())
def lrn_backward(x: Tensor, grad: Tensor, size: int, alpha: float, beta: float, k: float, group_size: int) -> Tensor:
    """dL/dx of :func:`lrn` given dL/dy (``grad``), recomputing the denominators from ``x``."""
    if _uses_kernel(x):
        from .lrn_triton import lrn_backward as kernel

        return kernel(x, grad, size, alpha, beta, k, check_groups(x.shape[1], group_size))
    return lrn_reference_backward(x, grad, size, alpha, beta, k, group_size)


@lrn.register_fake
def _(x, size, alpha, beta, k, group_size):
    check_groups(x.shape[1], group_size)
    return torch.empty_like(x)


@lrn_backward.register_fake
def _(x, grad, size, alpha, beta, k, group_size):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output) -> None:
    x, *ctx.hyper = inputs
    ctx.save_for_backward(x)


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return lrn_backward(x, grad.to(x.dtype), *ctx.hyper), None, None, None, None, None


lrn.register_autograd(_backward, setup_context=_setup_context)
