"""The LRN operator (trainer/lrn.py): registration, compile, and its Triton kernels under the interpreter.

The numerics of the reference (numpy formula, torch's LRN per column, fp64 gradcheck, bf16 effect)
are in tests/test_model.py; the kernels against the reference in tests/_interpreted_kernels.py, run here.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alexnet.trainer import lrn as L
from alexnet.trainer.model import LocalResponseNorm

HERE = Path(__file__).resolve().parent


def _args(x):
    return (x, 5, 2e-5, 0.75, 2.0, 48)


@pytest.mark.parametrize("channels_last", [False, True])
def test_operator_registration(channels_last):
    """Schema, fake (meta) implementation, autograd registration, as torch.library checks them."""
    x = torch.randn(2, 96, 4, 3, dtype=torch.float64) * 30
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.alexnet.lrn.default, _args(x.requires_grad_()))
    torch.library.opcheck(torch.ops.alexnet.lrn_backward.default, (x.detach(), torch.randn_like(x), *_args(x)[1:]))


def test_compiled_matches_eager():
    """torch.compile traces the operator through its fake implementation and differentiates it through
    its registered backward; the result is the eager one."""
    norm = LocalResponseNorm(alpha=2e-5, group_size=48)
    x = (torch.randn(2, 96, 5, 5) * 40).contiguous(memory_format=torch.channels_last)
    outs = []
    for fn in (norm, torch.compile(norm, backend="aot_eager", fullgraph=True)):
        leaf = x.clone().requires_grad_()
        y = fn(leaf)
        y.backward(torch.cos(y.detach()))
        outs.append((y.detach(), leaf.grad))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    assert outs[1][0].is_contiguous(memory_format=torch.channels_last)


def test_group_size_must_divide_the_maps():
    with pytest.raises(ValueError, match="10 channels are not a multiple of group_size 4"):
        LocalResponseNorm(group_size=4)(torch.randn(1, 10, 2, 2))


def test_triton_kernels_under_the_interpreter():
    """The kernels on CPU tensors by Triton's interpreter, in a subprocess (TRITON_INTERPRET=1 must be
    set before triton is imported and must not reach the other tests)."""
    pytest.importorskip("triton", reason="triton is in the dev extra on x86_64 (setup.cfg)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "_interpreted_kernels.py")]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=HERE.parent)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]


def test_kernels_are_not_used_on_the_cpu():
    assert not L._uses_kernel(torch.zeros(1))


def test_paper_sgd_operator_registration():
    """The update operator (trainer/optim.py) as torch.library checks it; on the CPU it is the
    multi-tensor form (bitwise the per-tensor update: tests/test_step.py)."""
    from alexnet.trainer.optim import foreach_update

    gen = torch.Generator().manual_seed(0)
    w, g, v = ([torch.randn(5, 3, generator=gen), torch.randn(4, generator=gen)] for _ in range(3))
    torch.library.opcheck(
        torch.ops.alexnet.paper_sgd_.default, ([t.clone() for t in w], g, [t.clone() for t in v], 0.01, 0.9, 5e-4)
    )
    ours, theirs = ([t.clone() for t in w], [t.clone() for t in v]), ([t.clone() for t in w], [t.clone() for t in v])
    torch.ops.alexnet.paper_sgd_(ours[0], g, ours[1], 0.01, 0.9, 5e-4)
    foreach_update(theirs[0], g, theirs[1], 0.01, 0.9, 5e-4)
    assert all(torch.equal(a, b) for a, b in zip(ours[0] + ours[1], theirs[0] + theirs[1], strict=True))


@pytest.mark.gpu
def test_kernels_on_a_gpu():
    """On CUDA the operators run the Triton kernels: the LRN against the reference (fp32 1e-5, bf16 within
    one bf16 rounding) eager and compiled, the update against the multi-tensor form."""
    from alexnet.trainer.optim import foreach_update

    x = (torch.randn(8, 96, 27, 27, device="cuda") * 40).contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(x)
    hyper = (5, 2e-5, 0.75, 2.0, 48)
    for dtype, rtol in ((torch.float32, 1e-5), (torch.bfloat16, 2**-8)):
        xd, gd = x.to(dtype), g.to(dtype)
        ref = L.lrn_reference(xd.float(), *hyper)
        compiled = torch.compile(lambda t: L.lrn(t, *hyper), fullgraph=True)(xd)
        for y in (L.lrn(xd, *hyper), compiled):
            torch.testing.assert_close(y.float(), ref, rtol=rtol, atol=0)
        ref_dx = L.lrn_reference_backward(xd.float(), gd.float(), *hyper)
        scale = float(ref_dx.abs().max())
        torch.testing.assert_close(L.lrn_backward(xd, gd, *hyper).float(), ref_dx, rtol=rtol, atol=rtol * scale)
    w, grad, v = (torch.randn(64, 3, 11, 11, device="cuda") for _ in range(3))
    ours, theirs = [w.clone()], [w.clone()]
    vo, vt = [v.clone()], [v.clone()]
    torch.ops.alexnet.paper_sgd_(ours, [grad], vo, 0.01, 0.9, 5e-4)
    foreach_update(theirs, [grad], vt, 0.01, 0.9, 5e-4)
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=4 * 2**-23 * float(theirs[0].abs().max()))


def test_export_holds_plain_operators_only():
    """torch.export (trainer/export.py) traces the reference arithmetic: the exported file runs in plain
    PyTorch, where this package's operators are not registered."""
    norm = LocalResponseNorm(alpha=2e-5, group_size=4)
    x = torch.randn(2, 8, 3, 3) * 30
    program = torch.export.export(norm, (x,))
    assert "alexnet" not in program.graph_module.code
    torch.testing.assert_close(program.module()(x), norm(x), rtol=1e-6, atol=0)
