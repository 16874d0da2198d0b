"""benchmarks/bench_bytes.py's counting rule on operators whose traffic is known."""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_bytes import ByteCount, at_batch  # noqa: E402

sys.path.remove(str(ROOT / "benchmarks"))


def test_the_counting_rule():
    a, b = torch.ones(10, 10), torch.ones(10, 10)  # 400 bytes each
    w = [torch.zeros(25), torch.zeros(75)]  # 400 bytes in all
    x = torch.ones(1, 8, 5, 5, dtype=torch.bfloat16)  # 400 bytes
    count = ByteCount()
    with count:
        torch.add(a, b)  # reads 2, returns 1
        a.view(100).t()  # views: nothing
        a.relu_()  # reads a, returns a
        torch._foreach_add_(w, w)  # returns nothing: the written list counts again
        torch.ops.alexnet.lrn(x, 5, 2e-5, 0.75, 2.0, 4)  # the kernel's x in, y out
        torch.ops.alexnet.lrn_backward(x, x, 5, 2e-5, 0.75, 2.0, 4)  # x and dy in, dx out
    assert dict(count.bytes) == {
        "add": 1200,
        "relu_": 800,
        "_foreach_add_": 1200,
        "alexnet.lrn": 800,
        "alexnet.lrn_backward": 1200,
    }
    assert count.calls["add"] == 1 and "view" not in count.calls and "t" not in count.calls


def test_linear_extrapolation_in_the_batch():
    small, large = ByteCount(), ByteCount()
    small.bytes.update({"conv": 300, "update": 1000})  # batch 2
    large.bytes.update({"conv": 500, "update": 1000})  # batch 4: conv grows 100 per image
    assert at_batch((small, large), (2, 4), 128) == {"conv": 100 + 100 * 128, "update": 1000}
