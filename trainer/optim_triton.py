"""The CUDA implementation of ``alexnet::paper_sgd_`` (optim.py): §5's update in one Triton kernel.

The multi-tensor form makes four passes over the parameters (v *= mom; v += -lr*wd * w; v += -lr * g;
w += v), 44 bytes per float32 parameter; this kernel loads w, g and v once, does the same four
operations in the same order in float32 registers, and stores v and w: 20 bytes. One launch per
tensor (16 for the network's weights and biases). Whether it is bitwise the multi-tensor form on a
GPU (both may contract a multiply and an add into one FMA) is one of benchmarks/gpu_probe.py's
figures; under Triton's interpreter (numpy, no FMA) it agrees within float32 rounding
(tests/_interpreted_kernels.py).

Importing this module imports triton.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .lrn_triton import on_device

BLOCK = 1024


@triton.jit
def _paper_sgd(w_ptr, g_ptr, v_ptr, n, momentum, neg_lr_wd, neg_lr, DECAY: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    w = tl.load(w_ptr + offsets, mask=mask)
    g = tl.load(g_ptr + offsets, mask=mask)
    v = tl.load(v_ptr + offsets, mask=mask)
    v = v * momentum
    if DECAY:
        v = v + neg_lr_wd * w
    v = v + neg_lr * g
    tl.store(v_ptr + offsets, v, mask=mask)
    tl.store(w_ptr + offsets, w + v, mask=mask)


def fused_update(
    params: list[Tensor], grads: list[Tensor], velocities: list[Tensor], lr: float, momentum: float, weight_decay: float
) -> None:
    """The update of each (w, g, v), all float32 with one dense layout (optim.py ``_fusable``)."""
    for w, g, v in zip(params, grads, velocities, strict=True):
        n = w.numel()
        grid = (triton.cdiv(n, BLOCK),)
        with on_device(w):
            _paper_sgd[grid](w, g, v, n, momentum, -lr * weight_decay, -lr, DECAY=bool(weight_decay), BLOCK=BLOCK)
