"""The paper's update rule (§5) as a torch optimiser.

    v <- momentum * v - weight_decay * lr * w - lr * dL/dw
    w <- w + v

The learning rate sits inside the velocity, as in the paper and cuda-convnet. ``torch.optim.SGD``
instead keeps v <- momentum * v + (g + wd * w) and w <- w - lr * v, which is the same only while the
learning rate is constant: after a /10 drop the paper's velocity still carries the old step sizes
and decays over a few steps, torch's is rescaled at once.

Weight decay is applied to the parameter groups that ask for it; :func:`param_groups` decays the
weights (conv kernels and fc matrices) and not the biases, as cuda-convnet's layer definitions
(``wc`` on weights only) did. The paper's text does not mention biases.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .lrn import triton_available


def foreach_update(
    params: list[Tensor], grads: list[Tensor], velocities: list[Tensor], lr: float, momentum: float, weight_decay: float
) -> None:
    """§5 on a list of tensors of one device, four multi-tensor kernels (``torch._foreach_*``): the same
    operations in the same order as the per-tensor form, so bitwise the same (tests/test_step.py).
    Each pass reads and writes whole tensors: 44 bytes per float32 parameter in all."""
    # v = mom * v - lr * wd * w - lr * g; w = w + v
    torch._foreach_mul_(velocities, momentum)
    if weight_decay:
        torch._foreach_add_(velocities, params, alpha=-lr * weight_decay)
    torch._foreach_add_(velocities, grads, alpha=-lr)
    torch._foreach_add_(params, velocities)


@torch.library.custom_op("alexnet::paper_sgd_", mutates_args=("params", "velocities"))
def paper_sgd_(
    params: list[Tensor], grads: list[Tensor], velocities: list[Tensor], lr: float, momentum: float, weight_decay: float
) -> None:
    """§5's update in place. CUDA float32: one Triton kernel per tensor (optim_triton.py) doing the
    four passes' operations in registers, 20 bytes per parameter (w, g, v read; w, v written);
    elsewhere :func:`foreach_update`."""
    fusable = all(_fusable(p, g, v) for p, g, v in zip(params, grads, velocities, strict=True))
    if params and params[0].is_cuda and triton_available() and fusable:
        from .optim_triton import fused_update

        fused_update(params, grads, velocities, lr, momentum, weight_decay)
    else:
        foreach_update(params, grads, velocities, lr, momentum, weight_decay)


@paper_sgd_.register_fake
def _(params, grads, velocities, lr, momentum, weight_decay) -> None:
    return None


def _fusable(p: Tensor, g: Tensor, v: Tensor) -> bool:
    """One float32 layout over the same dense memory order: the kernel walks the three flat."""
    dense = p.is_contiguous() or p.is_contiguous(memory_format=torch.channels_last)
    same = p.dtype == g.dtype == v.dtype == torch.float32 and p.stride() == g.stride() == v.stride()
    return dense and same


class PaperSGD(torch.optim.Optimizer):
    def __init__(self, params, lr: float, momentum: float, weight_decay: float = 0.0) -> None:
        if lr <= 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError(f"invalid hyper-parameters lr={lr}, momentum={momentum}, weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter with a gradient: one ``alexnet::paper_sgd_`` per group and
        device (four multi-tensor kernels, or on CUDA one fused kernel per tensor)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            for params, grads, velocities in self._by_device(group):
                paper_sgd_(params, grads, velocities, lr, mom, wd)
        return loss

    def _by_device(self, group: dict) -> list[tuple[list, list, list]]:
        """(params, grads, velocities) of a group's parameters with a gradient, per (device, dtype): a
        multi-tensor kernel takes the tensors of one device (the split form has two)."""
        out: dict[tuple, tuple[list, list, list]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "velocity" not in state:
                state["velocity"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            lists = out.setdefault((p.device, p.dtype), ([], [], []))
            for items, t in zip(lists, (p, p.grad, state["velocity"]), strict=True):
                items.append(t)
        return list(out.values())


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weights decayed, biases not (see module docstring); a stable order for checkpoints."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def create_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> PaperSGD:
    return PaperSGD(param_groups(model, weight_decay), lr=lr, momentum=momentum, weight_decay=weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
