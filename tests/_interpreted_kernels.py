"""The Triton LRN kernels (trainer/lrn_triton.py) run on CPU tensors by Triton's interpreter, against
the reference arithmetic (trainer/lrn.py). Not collected by the suite itself: tests/test_lrn.py runs
this file in a pytest subprocess with TRITON_INTERPRET=1 set before triton is imported, so the
setting cannot leak into the other tests.

Tolerances: float32 within 1e-5 relative (forward element by element; backward relative to the
gradient's largest element, since a gradient element can cancel to near zero). bf16 inputs: the
interpreter has no bf16 arithmetic, and the kernel has none either: it loads bf16, computes in
float32 and rounds once on the store, so its output is the float32 reference of the same bf16
values narrowed once. The interpreter narrows float32 to bf16 by truncation (``cast_impl`` passes no
rounding mode to ``_convert_float`` in triton/runtime/interpreter.py; the GPU rounds to nearest
even), so the test compares with the truncated reference.
"""

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - a guard for running it by hand
    pytest.skip("run by tests/test_lrn.py with TRITON_INTERPRET=1", allow_module_level=True)

from alexnet.trainer import lrn as L  # noqa: E402
from alexnet.trainer import lrn_triton as T  # noqa: E402
from alexnet.trainer.model import AlexNet, lrn_alpha  # noqa: E402

SIZE, BETA, K = 5, 0.75, 2.0
# (shape, group_size): conv1's two columns (48 maps each, a block spanning two of the kernel's
# 32-map tiles, pixels not a whole tile); one block smaller than a tile.
CASES = [((2, 96, 7, 5), 48), ((1, 7, 3, 3), 0)]


def _input(shape, channels_last: bool, seed: int) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 40
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _reference_grad(x, g, alpha, group):
    leaf = x.detach().clone().requires_grad_()
    (dx,) = torch.autograd.grad(L.lrn_reference(leaf, SIZE, alpha, BETA, K, group), leaf, g)
    return dx


def _close_backward(dx, ref):
    torch.testing.assert_close(dx, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.fixture(params=["authors", "paper-text"])
def alpha(request):
    return lrn_alpha(request.param)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_forward_and_backward_float32(alpha, channels_last):
    for seed, (shape, group) in enumerate(CASES):
        x = _input(shape, channels_last, seed)
        y = T.lrn_forward(x, SIZE, alpha, BETA, K, group or shape[1])
        ref = L.lrn_reference(x, SIZE, alpha, BETA, K, group)
        assert y.dtype == x.dtype and y.stride() == x.stride()
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=0)
        assert not torch.allclose(y, x / K**BETA, rtol=1e-3)  # the neighbours count
        g = _input(shape, not channels_last, seed + 10) / 40  # dL/dy in the other layout
        dx = T.lrn_backward(x, g, SIZE, alpha, BETA, K, group or shape[1])
        assert dx.stride() == x.stride()
        _close_backward(dx, _reference_grad(x, g, alpha, group))


def _truncated(t: torch.Tensor) -> torch.Tensor:
    """float32 to bf16 by truncation, the interpreter's cast (module docstring)."""
    return (t.float().view(torch.int32) & -65536).view(torch.float32).bfloat16()


def test_bfloat16_loaded_and_computed_in_float32():
    x = _input((2, 96, 6, 6), True, 3).bfloat16()
    alpha = lrn_alpha("authors")
    y = T.lrn_forward(x, SIZE, alpha, BETA, K, 48)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    ref = L.lrn_reference(x.float(), SIZE, alpha, BETA, K, 48)  # the same bf16 values, in float32
    assert (y == _truncated(ref)).float().mean() > 0.99  # narrowed once, from float32
    torch.testing.assert_close(y.float(), ref, rtol=2**-7, atol=0)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).bfloat16()
    dx = T.lrn_backward(x, g, SIZE, alpha, BETA, K, 48)
    ref_dx = _reference_grad(x.float(), g.float(), alpha, 48)
    assert (dx == _truncated(ref_dx)).float().mean() > 0.99
    torch.testing.assert_close(dx.float(), ref_dx, rtol=2**-7, atol=1e-6 * float(ref_dx.abs().max()))


def _through_op(norm, x, kernel: bool, monkeypatch):
    """The model's norm layer (the alexnet::lrn operator, autograd included) on the kernels or the reference."""
    monkeypatch.setattr(L, "_uses_kernel", lambda t: kernel)
    leaf = x.detach().clone().requires_grad_()
    y = norm(leaf)
    y.backward(torch.cos(y.detach()))
    return y.detach(), leaf.grad


@pytest.mark.parametrize("form", ["grouped", "split"])
def test_the_models_norm_layers(form, monkeypatch):
    """norm1 and norm2 as each placement calls them: grouped, both columns' maps in one tensor in
    blocks of 48 / 128; split, one column's maps (one block)."""
    model = AlexNet(num_classes=10, devices=["cpu", "cpu"] if form == "split" else None)
    columns = 2 if form == "grouped" else 1
    for name, maps in (("norm1", 48), ("norm2", 128)):
        norm = getattr(model, name)
        x = torch.relu(_input((2, columns * maps, 5, 4), True, maps))
        y, dx = _through_op(norm, x, True, monkeypatch)
        ref_y, ref_dx = _through_op(norm, x, False, monkeypatch)
        torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=0)
        _close_backward(dx, ref_dx)


@pytest.mark.parametrize("weight_decay", [5e-4, 0.0])
def test_fused_paper_sgd_update(weight_decay):
    """The fused §5 update (trainer/optim_triton.py) against the multi-tensor one, on a conv weight in
    channels_last and a bias, float32. numpy has no FMA where the CPU's aten kernels may use one:
    within 4 float32 ulps of each tensor's scale rather than bitwise."""
    from alexnet.trainer.optim import foreach_update
    from alexnet.trainer.optim_triton import fused_update

    gen = torch.Generator().manual_seed(7)
    shapes = [(8, 3, 5, 5), (1500,)]
    w = [torch.randn(s, generator=gen) * 0.01 for s in shapes]
    w[0] = w[0].contiguous(memory_format=torch.channels_last)
    g = [torch.randn_like(t) for t in w]
    v = [torch.randn_like(t) * 1e-3 for t in w]
    ours = [[t.clone() for t in ts] for ts in (w, v)]
    theirs = [[t.clone() for t in ts] for ts in (w, v)]
    for _ in range(3):
        fused_update(ours[0], g, ours[1], 0.01, 0.9, weight_decay)
        foreach_update(theirs[0], g, theirs[1], 0.01, 0.9, weight_decay)
    for a, b in zip(ours[0] + ours[1], theirs[0] + theirs[1], strict=True):
        assert a.stride() == b.stride()
        torch.testing.assert_close(a, b, rtol=0, atol=4 * 2**-23 * float(b.abs().max()))  # 4 ulps
    assert not torch.equal(ours[0][0], w[0])  # the weights moved
