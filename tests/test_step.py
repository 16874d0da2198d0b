"""The training step: PaperSGD's multi-tensor update, --precision, --compile (eager vs compiled, one
process, the split form and two gloo replicas), and the GPU-only checks (marked, skipped here)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alexnet.pipeline import constants as C
from alexnet.pipeline.errors import AlexnetError
from alexnet.trainer import distributed as D
from alexnet.trainer.config import TrainConfig
from alexnet.trainer.model import AlexNet
from alexnet.trainer.optim import PaperSGD, create_optimizer, set_lr
from alexnet.trainer.precision import autocast, loader_dtype, resolve_precision
from alexnet.trainer.step import EagerStep, create_step, train_step

HERE = Path(__file__).resolve().parent
TORCHRUN = Path(sys.executable).parent / "torchrun"

# --------------------------------------------------------------------------- PaperSGD


def _reference_update(params, velocities, lr, mom, wd):
    """§5 as written, one tensor at a time (the per-tensor loop PaperSGD had before)."""
    for p, v in zip(params, velocities, strict=True):
        v.mul_(mom)
        if wd:
            v.add_(p, alpha=-lr * wd)
        v.add_(p.grad, alpha=-lr)
        p.add_(v)


def test_paper_sgd_multi_tensor_is_bitwise_the_per_tensor_update():
    """Five steps over a decayed and an undecayed group, a parameter without a gradient in one step
    and a rate drop: the same bits as the per-tensor reference, velocities included."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 3, 3, 3), (6,), (4, 10), (4,), (7, 2)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    ref = [p.detach().clone() for p in ours]
    ref_v = [torch.zeros_like(p) for p in ref]
    groups = [([0, 2, 4], 5e-4), ([1, 3], 0.0)]
    opt = PaperSGD([{"params": [ours[i] for i in idx], "weight_decay": wd} for idx, wd in groups], 0.01, 0.9)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]  # torch's SGD: lr outside the velocity
    sgd = torch.optim.SGD([{"params": [theirs[i] for i in idx], "weight_decay": wd} for idx, wd in groups], 0.01, 0.9)
    for step in range(5):
        if step == 3:
            set_lr(opt, 0.001)  # the /10 drop: the velocity keeps the old step sizes (§5's form)
            set_lr(sgd, 0.001)
        for p, r, q in zip(ours, ref, theirs, strict=True):
            p.grad = None if (step == 1 and p is ours[4]) else torch.randn(p.shape, generator=gen)
            r.grad = q.grad = None if p.grad is None else p.grad.clone()
        sgd.step()
        opt.step()
        lr = opt.param_groups[0]["lr"]
        for idx, wd in groups:
            live = [i for i in idx if ref[i].grad is not None]
            _reference_update([ref[i] for i in live], [ref_v[i] for i in live], lr, 0.9, wd)
        for p, r in zip(ours, ref, strict=True):
            assert torch.equal(p.detach(), r)
    # ...and not torch's SGD, which agrees with §5 until the drop and differs after it.
    assert not torch.allclose(
        torch.cat([p.detach().reshape(-1) for p in ours]),
        torch.cat([q.detach().reshape(-1) for q in theirs]),
        rtol=1e-4,
        atol=0,
    )
    # The state keeps its format (one "velocity" per parameter), so checkpoints load as before.
    state = opt.state_dict()
    assert set(state["state"]) == set(range(5)) and all(set(s) == {"velocity"} for s in state["state"].values())
    for p, v in zip(ours, ref_v, strict=True):
        assert torch.equal(opt.state[p]["velocity"], v)


def test_paper_sgd_state_dict_round_trip_continues_exactly():
    torch.manual_seed(0)
    model = AlexNet(num_classes=10)
    x, y = torch.randn(2, 3, 224, 224) * 50, torch.tensor([1, 2])
    opt = create_optimizer(model, 0.01, 0.9, 5e-4)
    model.eval()  # no dropout: the two continuations see the same function
    train_step(model, opt, x, y, precision="fp32")
    copy = AlexNet.from_state_dict(model.state_dict()).eval()
    copy_opt = create_optimizer(copy, 0.01, 0.9, 5e-4)
    saved = io.BytesIO()  # through a file, as a checkpoint (load_state_dict would share the tensors)
    torch.save(opt.state_dict(), saved)
    copy_opt.load_state_dict(torch.load(io.BytesIO(saved.getvalue()), weights_only=True))
    for m, o in ((model, opt), (copy, copy_opt)):
        train_step(m, o, x, y, precision="fp32")
    for (k, a), b in zip(model.state_dict().items(), copy.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_weight_decay_on_weights_not_biases():
    layer = torch.nn.Linear(3, 2)
    opt = create_optimizer(layer, lr=0.1, momentum=0.0, weight_decay=0.5)
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    layer.weight.grad = torch.zeros_like(layer.weight)
    layer.bias.grad = torch.zeros_like(layer.bias)
    opt.step()
    torch.testing.assert_close(layer.weight.detach(), w0 * (1 - 0.1 * 0.5))
    torch.testing.assert_close(layer.bias.detach(), b0)


def test_training_step_uses_the_batch_mean_gradient():
    """§5 / cuda-convnet: the weight gradient is the mean over the batch (the sum scaled by 1/N). One real
    training step at lr 1, no momentum or decay, moves every weight by minus the mean of the examples'
    own gradients; the network in float64 and eval mode, so no dropout draw differs."""
    from alexnet.trainer.model import AlexNet
    from alexnet.trainer.step import train_step

    torch.manual_seed(0)
    model = AlexNet(num_classes=4).double().eval()
    x = torch.randn(3, 3, C.CROP_SIZE, C.CROP_SIZE, dtype=torch.float64) * 50
    y = torch.tensor([0, 2, 3])
    per_example = []
    for i in range(3):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        per_example.append({n: p.grad.clone() for n, p in model.named_parameters()})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = PaperSGD(model.parameters(), lr=1.0, momentum=0.0)
    train_step(model, opt, x, y, precision="fp32")
    for n, p in model.named_parameters():
        mean_grad = sum(g[n] for g in per_example) / 3
        # train_step computes the loss from float32 logits: agreement to float32's softmax round-off,
        # far closer than the sum (3x) would be.
        torch.testing.assert_close(
            before[n] - p.detach(), mean_grad, rtol=1e-3, atol=1e-3 * mean_grad.abs().max().item()
        )


# --------------------------------------------------------------------------- precision


def test_precision_resolution_and_loader_dtype():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_precision("auto", cpu) == "fp32" and resolve_precision("auto", gpu) == "bf16"
    assert resolve_precision("fp16", cpu) == "fp16"
    assert [loader_dtype(p, gpu) for p in ("auto", "fp32", "bf16", "fp16")] == [
        "bfloat16",
        "float32",
        "bfloat16",
        "float16",
    ]
    assert loader_dtype("auto", cpu) == "float32"
    with pytest.raises(AlexnetError, match="precision 'tf32'"):
        resolve_precision("tf32", cpu)
    with pytest.raises(AlexnetError, match="precision"):
        TrainConfig.create(precision="fp8")
    with autocast("bf16", cpu):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast("fp32", cpu):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32


def test_fp16_step_scales_the_loss_and_skips_an_overflowing_update():
    torch.manual_seed(0)
    model = AlexNet(num_classes=10).eval()
    opt = create_optimizer(model, 0.01, 0.9, 5e-4)
    step = EagerStep(model, opt, precision="fp16")
    assert step.scaler is not None and step.scaler.get_scale() == 2.0**16
    x, y = torch.randn(2, 3, 224, 224) * 50, torch.tensor([1, 2])
    before = [p.detach().clone() for p in model.parameters()]
    loss = step(x, y)
    assert torch.isfinite(loss)
    changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)]
    # Either the update ran (weights changed) or the scaler found an overflow and lowered the scale.
    assert all(changed) or step.scaler.get_scale() < 2.0**16


def test_create_step_on_the_cpu_is_eager_fp32_by_default():
    model = AlexNet(num_classes=10)
    opt = create_optimizer(model, 0.01, 0.9, 5e-4)
    cpu = [torch.device("cpu")]
    step = create_step(model, opt, TrainConfig.create(precision="auto").model, cpu, 1)
    assert type(step) is EagerStep and step.precision == "fp32" and step.note == "fp32, eager"


def test_gpus_auto_with_more_than_two_gpus_says_what_it_does(monkeypatch):
    from alexnet.trainer.replica import resolve_replica

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    replica = resolve_replica("auto", D.DistInfo())
    assert [str(d) for d in replica.devices] == ["cuda:0", "cuda:1"]
    assert "auto: 8 CUDA device(s) visible" in replica.note
    assert "torchrun --nproc-per-node 8" in replica.note and "\n" not in replica.note
    two = resolve_replica("auto", D.DistInfo(rank=1, world_size=4, local_rank=1, local_world_size=4))
    assert [str(d) for d in two.devices] == ["cuda:2", "cuda:3"] and "torchrun" not in two.note


def test_parse_gpus(monkeypatch):
    from alexnet.trainer.replica import parse_gpus

    assert parse_gpus("cpu") == [torch.device("cpu")]
    assert parse_gpus(" CPU ") == [torch.device("cpu")]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert parse_gpus("0,1") == [torch.device("cuda:0"), torch.device("cuda:1")]
    assert parse_gpus("1") == [torch.device("cuda:1")]
    assert parse_gpus("1, 0") == [torch.device("cuda:1"), torch.device("cuda:0")]
    for bad, message in [
        ("", "expected 'cpu'"),
        ("gpu0", "expected 'cpu'"),
        ("-1", "expected 'cpu'"),
        ("0,1,2", "two columns"),
        ("0,0", "named twice"),
        ("2", r"GPU 2 not available \(torch sees 2"),
    ]:
        with pytest.raises(AlexnetError, match=message):
            parse_gpus(bad)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(AlexnetError, match="GPU 0 not available"):
        parse_gpus("0")


# --------------------------------------------------------------------------- --compile


def _steps(model, batches, precision="fp32"):
    opt = create_optimizer(model, 0.01, 0.9, 5e-4)
    losses = []
    for i, (x, y) in enumerate(batches):
        if i == 2:
            set_lr(opt, 0.001)
        torch.manual_seed(100 + i)  # the same dropout draws for both sides
        losses.append(float(train_step(model, opt, x, y, precision=precision)))
    return losses, model.state_dict()


def _batches(n=3, b=4):
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(b, 3, 224, 224, generator=g) * 50, torch.randint(0, 10, (b,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("devices", [None, ["cpu", "cpu"]], ids=["grouped", "split"])
def test_compiled_training_steps_equal_eager(devices):
    """Three steps (dropout on, a rate drop) eager and compiled from the same weights: losses within 1e-5
    relative and weights within 1e-5 of the largest weight (float32 re-association of fused kernels).
    Inductor's fallback_random makes dropout draw from torch's generator as eager does."""
    import torch._inductor.config as inductor_config

    torch.manual_seed(0)
    eager = AlexNet(num_classes=10, devices=devices).train()
    compiled = AlexNet.from_state_dict(eager.state_dict(), devices=devices).train().compile_forward()
    batches = _batches()
    with inductor_config.patch(fallback_random=True):
        (la, wa), (lb, wb) = _steps(eager, batches), _steps(compiled, batches)
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=0)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-5 * float(wa[k].abs().max()), msg=k)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # same canonical checkpoint layout


@pytest.mark.skipif(not TORCHRUN.exists(), reason=f"torchrun not found beside {sys.executable}")
def test_compiled_ddp_two_replicas_equal_one_process_on_the_global_batch(tmp_path):
    """Two gloo replicas with --compile, 8 images each, dropout off: the same weights after two steps
    as one eager process on the 16 images (DDP averages the replicas' mean gradients)."""
    out = tmp_path / "ddp"
    out.mkdir()
    cmd = [
        str(TORCHRUN),
        "--nproc-per-node",
        "2",
        "--master-port",
        "29631",
        str(HERE / "_ddp_step_worker.py"),
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from _ddp_step_worker import batches, build

    model = build()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    opt = create_optimizer(model, 0.01, 0.9, 5e-4)
    for x, y in batches():
        train_step(model, opt, x, y, precision="fp32")
    expected = model.state_dict()
    # Each tensor's update (w - w0) within 2% of the eager one's largest entry: compiled kernels sum in
    # another order (measured 0.7% at most, in conv2); a replica's gradient lost or counted twice would
    # be off by about 50%.
    for rank in (0, 1):
        got = torch.load(out / f"weights-rank{rank}.pt", weights_only=True)
        for k in expected:
            update = float((expected[k] - start[k]).abs().max())
            assert float((got[k] - expected[k]).abs().max()) <= 0.02 * update, f"rank {rank} {k}"
    first, second = (torch.load(out / f"weights-rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(first[k], second[k]) for k in first)  # the replicas stay in sync


# --------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
def test_graphed_compiled_bf16_steps_make_no_host_sync():
    """The one-GPU step (bf16, channels_last, compiled, CUDA graph) after its warm-up: steps and the
    on-device loss sum run under set_sync_debug_mode("error"); reading happens outside it. The
    trainer's logging between reads is checked the same way in tests/test_train.py (helper "sync")."""
    dev = torch.device("cuda", 0)
    torch.manual_seed(0)
    model = AlexNet(num_classes=10, devices=[dev]).to(memory_format=torch.channels_last).train()
    opt = create_optimizer(model, 0.01, 0.9, 5e-4)
    step = create_step(model, opt, TrainConfig.create(compile=True).model, [dev], 1)
    x = (torch.randn(32, 3, 224, 224, device=dev) * 50).to(torch.bfloat16)
    y = torch.randint(0, 10, (32,), device=dev)
    for _ in range(5):  # eager warm-up and capture
        step(x, y)
    total = torch.zeros((), device=dev)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            total += step(x, y)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(total).item()


@pytest.mark.gpu
def test_fp16_and_bf16_steps_learn_on_the_gpu():
    dev = torch.device("cuda", 0)
    for precision in ("bf16", "fp16"):
        torch.manual_seed(0)
        model = AlexNet(num_classes=10, devices=[dev]).to(memory_format=torch.channels_last).eval()
        step = create_step(
            model, create_optimizer(model, 0.01, 0.9, 5e-4), TrainConfig.create(precision=precision).model, [dev], 1
        )
        x, y = torch.randn(16, 3, 224, 224, device=dev) * 50, torch.arange(16, device=dev) % 10
        losses = [float(step(x, y)) for _ in range(12)]
        assert losses[-1] < losses[0], (precision, losses)
    assert "no CUDA graph under fp16" in step.note


# --------------------------------------------------------------------------- CUDA graphs


def test_cuda_graph_applies_only_to_one_cuda_device_in_one_process():
    from alexnet.trainer.step import uses_cuda_graph

    on = TrainConfig().model.cuda_graph
    assert on  # the default: graphs wherever they apply
    assert uses_cuda_graph(on, [torch.device("cuda:0")], 1)
    assert not uses_cuda_graph(on, [torch.device("cpu")], 1)
    assert not uses_cuda_graph(on, [torch.device("cuda:0"), torch.device("cuda:1")], 1)
    assert not uses_cuda_graph(on, [torch.device("cuda:0")], 2)
    assert not uses_cuda_graph(False, [torch.device("cuda:0")], 1)
    # Set before any CUDA context (replica.py, at import): DALI's streams must not share hardware
    # queues with training.
    from alexnet.trainer import replica  # noqa: F401

    assert int(os.environ["CUDA_DEVICE_MAX_CONNECTIONS"]) >= 16


@pytest.mark.gpu
def test_graphed_step_equals_eager_steps_bitwise_across_an_lr_drop():
    """The CUDA-graph step runs the eager step's kernels: same losses, weights and RNG state."""
    from alexnet.trainer.model import AlexNet
    from alexnet.trainer.optim import set_lr
    from alexnet.trainer.step import GraphedStep, train_step

    dev = torch.device("cuda:0")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    g = torch.Generator(device=dev).manual_seed(5)
    batches = [
        (
            torch.randn(16, 3, 224, 224, device=dev, generator=g) * 50,
            torch.randint(0, 10, (16,), device=dev, generator=g),
        )
        for _ in range(8)
    ]
    kw = {"precision": "bf16"}
    results = []
    for graphed in (False, True):
        torch.manual_seed(0)
        model = AlexNet(num_classes=10, devices=[dev]).to(memory_format=torch.channels_last).train()
        opt = create_optimizer(model, 0.01, 0.9, 5e-4)
        torch.cuda.manual_seed(123)
        step = (
            GraphedStep(model, opt, **kw)
            if graphed
            else (lambda x, y, model=model, opt=opt: train_step(model, opt, x, y, **kw))
        )
        losses = []
        for i, (x, y) in enumerate(batches):
            if i == 6:
                set_lr(opt, 0.001)
            losses.append(float(step(x, y)))
        weights = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
        results.append((losses, weights, torch.cuda.get_rng_state()))
        if graphed:
            assert step.captures == 2  # at step 4 (after 3 eager ones) and again after the lr drop
    (l0, w0, r0), (l1, w1, r1) = results
    assert l0 == l1 and torch.equal(w0, w1) and torch.equal(r0, r1)
