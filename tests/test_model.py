"""The 2012 network: sizes, §3.3 normalisation against the formula, the three placements, init, state dicts."""

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alexnet.pipeline import constants as C
from alexnet.pipeline.errors import AlexnetError
from alexnet.trainer import constants as TC
from alexnet.trainer.model import AlexNet, LocalResponseNorm, PaperDropout, count_parameters

CPU = torch.device("cpu")
TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (one per column)")
ONE_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _model(seed=0, num_classes=10, devices=None):
    torch.manual_seed(seed)
    return AlexNet(num_classes=num_classes, devices=devices)


@pytest.fixture(scope="module")
def grouped():
    return _model()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, C.CROP_SIZE, C.CROP_SIZE, generator=torch.Generator().manual_seed(1)) * 50


def _round_trip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# --------------------------------------------------------------------------- reference implementations


def lrn_numpy(a: np.ndarray, block: int | None = None, alpha: float = TC.LRN_ALPHA) -> np.ndarray:
    """§3.3 written as a loop, float64; the sum stays within blocks of ``block`` maps (one column).
    ``alpha`` as the paper's text writes it by default."""
    a = a.astype(np.float64)
    n_maps = a.shape[1]
    block = block or n_maps
    half = TC.LRN_SIZE // 2
    b = np.empty_like(a)
    for start in range(0, n_maps, block):
        for i in range(block):
            lo, hi = max(0, i - half), min(block - 1, i + half)
            s = sum(a[:, start + j] ** 2 for j in range(lo, hi + 1))
            b[:, start + i] = a[:, start + i] / (TC.LRN_K + alpha * s) ** TC.LRN_BETA
    return b


def reference_forward(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """The network in eval mode written out from the canonical state dict (grouped weights, §3.2),
    with the authors' response normalisation (torch's module, per column) and the paper's test-time
    dropout (outputs x 0.5)."""

    def lrn(t, block):
        norm = torch.nn.LocalResponseNorm(TC.LRN_SIZE, TC.LRN_ALPHA, TC.LRN_BETA, TC.LRN_K)
        return torch.cat([norm(part) for part in t.split(block, dim=1)], dim=1)

    def pool(t):
        return F.max_pool2d(t, 3, 2)

    h = F.relu(F.conv2d(x, sd["conv1.weight"], sd["conv1.bias"], stride=4, padding=2))
    h = pool(lrn(h, 48))
    h = pool(lrn(F.relu(F.conv2d(h, sd["conv2.weight"], sd["conv2.bias"], padding=2, groups=2)), 128))
    h = F.relu(F.conv2d(h, sd["conv3.weight"], sd["conv3.bias"], padding=1))
    h = F.relu(F.conv2d(h, sd["conv4.weight"], sd["conv4.bias"], padding=1, groups=2))
    h = pool(F.relu(F.conv2d(h, sd["conv5.weight"], sd["conv5.bias"], padding=1, groups=2)))
    h = 0.5 * F.relu(F.linear(h.flatten(1), sd["fc6.weight"], sd["fc6.bias"]))
    h = 0.5 * F.relu(F.linear(h, sd["fc7.weight"], sd["fc7.bias"]))
    return F.linear(h, sd["fc8.weight"], sd["fc8.bias"])


# --------------------------------------------------------------------------- architecture


def test_parameter_count_and_canonical_layout():
    model = AlexNet()
    assert count_parameters(model) == TC.PARAMETER_COUNT_1000
    conv = sum(p.numel() for n, p in model.named_parameters() if n.startswith("conv"))
    assert conv == 2_334_080  # ALEXNET.md: conv 2,334,080; fc 58,631,144
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {
        "conv1.weight": (96, 3, 11, 11),
        "conv1.bias": (96,),
        "conv2.weight": (256, 48, 5, 5),
        "conv2.bias": (256,),
        "conv3.weight": (384, 256, 3, 3),
        "conv3.bias": (384,),
        "conv4.weight": (384, 192, 3, 3),
        "conv4.bias": (384,),
        "conv5.weight": (256, 192, 3, 3),
        "conv5.bias": (256,),
        "fc6.weight": (4096, 9216),
        "fc6.bias": (4096,),
        "fc7.weight": (4096, 4096),
        "fc7.bias": (4096,),
        "fc8.weight": (1000, 4096),
        "fc8.bias": (1000,),
    }
    assert model.canonical_shapes() == {k: torch.Size(v) for k, v in shapes.items()}


@pytest.mark.parametrize("devices", [None, ["cpu", "cpu"]], ids=["grouped", "split"])
def test_stage_sizes(devices, images):
    model = _model(devices=devices).eval()
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            outs = output if isinstance(output, list) else [output]
            seen.setdefault(name, []).append([tuple(o.shape[1:]) for o in outs])

        return hook

    for name in ("conv1", "pool1", "conv2", "pool2", "conv3", "conv4", "conv5", "pool5"):
        layer = getattr(model, name)
        # The split form runs each column's own convolution (its stages call layer.columns[i]).
        for module in layer.columns if devices and name.startswith("conv") else [layer]:
            module.register_forward_hook(record(name))
    assert model(images).shape == (2, 10)
    maps = {name: sum(s[0] for call in calls for s in call) for name, calls in seen.items()}
    sizes = {name: {s[1] for call in calls for s in call} for name, calls in seen.items()}
    assert sizes == {
        "conv1": {55},
        "pool1": {27},
        "conv2": {27},
        "pool2": {13},
        "conv3": {13},
        "conv4": {13},
        "conv5": {13},
        "pool5": {6},
    }
    assert maps == {
        "conv1": 96,
        "pool1": 96,
        "conv2": 256,
        "pool2": 256,
        "conv3": 384,
        "conv4": 384,
        "conv5": 256,
        "pool5": 256,
    }
    if devices:  # split: every stage ran once per column, half of the maps each
        assert all(len(calls) == 2 and len(calls[0]) == 1 for n, calls in seen.items() if n.startswith("conv"))
        assert seen["pool5"] == [[(128, 6, 6)], [(128, 6, 6)]]


# --------------------------------------------------------------------------- §3.3 normalisation


@pytest.mark.parametrize(("channels", "block"), [(7, None), (12, 4), (96, 48)])
def test_lrn_matches_numpy_formula(channels, block):
    rng = np.random.default_rng(channels)
    # Magnitudes up to ~100 so that alpha * sum(a^2) is comparable to k and the window matters.
    a = rng.normal(0.0, 40.0, size=(2, channels, 5, 4))
    out = LocalResponseNorm(group_size=block)(torch.from_numpy(a)).numpy()
    np.testing.assert_allclose(out, lrn_numpy(a, block), rtol=1e-12, atol=0)
    assert not np.allclose(out, a / TC.LRN_K**TC.LRN_BETA, rtol=1e-3)  # the neighbours really count


@pytest.mark.parametrize("name", ["norm1", "norm2"])
def test_default_norms_are_torch_lrn_per_column(grouped, name):
    """The authors' form (default): torch.nn.LocalResponseNorm(5, 1e-4, 0.75, 2) on each column's maps
    separately, an independent implementation (it divides alpha by n itself)."""
    maps = {"norm1": 96, "norm2": 256}[name]
    x = torch.from_numpy(np.random.default_rng(3).normal(0.0, 60.0, size=(2, maps, 6, 6)))
    torch_lrn = torch.nn.LocalResponseNorm(5, 1e-4, 0.75, 2)
    expected = torch.cat([torch_lrn(half) for half in x.chunk(2, dim=1)], dim=1)
    out = getattr(grouped, name)(x)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=0)
    # Across the column boundary the sum does not reach over.
    assert not torch.allclose(out, torch_lrn(x), rtol=1e-6)


@pytest.mark.parametrize("name", ["norm1", "norm2"])
def test_paper_text_norms_are_the_literal_formula(name):
    model = AlexNet(num_classes=10, lrn="paper-text")
    maps = {"norm1": 96, "norm2": 256}[name]
    a = np.random.default_rng(4).normal(0.0, 60.0, size=(1, maps, 5, 5))
    out = getattr(model, name)(torch.from_numpy(a)).numpy()
    np.testing.assert_allclose(out, lrn_numpy(a, maps // 2, alpha=1e-4), rtol=1e-12)
    authors = getattr(AlexNet(num_classes=10), name)(torch.from_numpy(a)).numpy()
    assert not np.allclose(out, authors, rtol=1e-3)  # five times the alpha is a different function
    with pytest.raises(AlexnetError, match="lrn 'bogus'"):
        AlexNet(num_classes=10, lrn="bogus")


def test_lrn_module_uses_alpha_as_given():
    x = torch.randn(2, 16, 3, 3, dtype=torch.float64) * 50
    ours = LocalResponseNorm()(x)
    # torch's module divides alpha by n: giving it n * alpha is the formula with alpha as written.
    torch_form = torch.nn.LocalResponseNorm(TC.LRN_SIZE, TC.LRN_SIZE * TC.LRN_ALPHA, TC.LRN_BETA, TC.LRN_K)(x)
    torch.testing.assert_close(ours, torch_form, rtol=1e-12, atol=0)


def test_lrn_channels_last_and_bf16_autocast():
    x = (torch.randn(2, 96, 9, 9) * 40).contiguous(memory_format=torch.channels_last)
    norm = LocalResponseNorm(group_size=48)
    expected = torch.from_numpy(lrn_numpy(x.numpy(), 48)).float()
    out = norm(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = norm(x.bfloat16())
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), expected, rtol=3e-2, atol=3e-2)
    # Gradient flows (autograd through the band convolution).
    x64 = torch.randn(1, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: LocalResponseNorm(group_size=4)(t * 30), (x64,))


def _normalisation_effect(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over a > 0 of 1 - (k + alpha * sum a^2 / k)^-beta, i.e. 1 - (b / a) * k^beta: how much the
    neighbours' activity shrinks a response beyond the constant k (0 when the sum is 0)."""
    a, b = a.double(), b.double()
    kept = a > 0
    return float((1 - b[kept] / a[kept] * TC.LRN_K**TC.LRN_BETA).mean())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lrn_denominator_is_float32_under_autocast(dtype):
    """§3.3 at the paper's init under autocast: conv1-like activations (ReLU of N(0, 11^2), conv1's
    shape at batch 4). In bf16 the denominator k + alpha * sum a^2 (near 2, spacing 0.0156) took 5
    values and the mean effect was 48% off the float64 one; computed in float32 it is within 10%."""
    a = torch.relu(torch.randn(4, 96, 55, 55, generator=torch.Generator().manual_seed(0)) * 11)
    norm = LocalResponseNorm(alpha=TC.LRN_ALPHA / TC.LRN_SIZE, group_size=48)  # the default (authors') form
    reference = _normalisation_effect(a, lrn_reference_float64(a.double(), 48))
    assert 0.002 < reference < 0.004  # the figure the issue measured (0.0027)
    with torch.autocast("cpu", dtype=dtype):
        low = a.to(dtype).contiguous(memory_format=torch.channels_last)
        out = norm(low)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert abs(_normalisation_effect(low, out) / reference - 1) < 0.10


def lrn_reference_float64(a: torch.Tensor, block: int) -> torch.Tensor:
    """The authors' form in plain torch float64: torch's own LRN on each column's maps."""
    torch_lrn = torch.nn.LocalResponseNorm(TC.LRN_SIZE, TC.LRN_ALPHA, TC.LRN_BETA, TC.LRN_K)
    return torch.cat([torch_lrn(half) for half in a.split(block, dim=1)], dim=1)


# --------------------------------------------------------------------------- placements


def test_three_forms_compute_the_same_function(grouped, images):
    """Grouped (one device), split (the per-column path, both columns on the CPU) and a written-out
    reference from the canonical state dict agree, in float64."""
    sd = {k: v.double() for k, v in grouped.state_dict().items()}
    one = AlexNet.from_state_dict(sd).double().eval()
    split = AlexNet.from_state_dict(sd, devices=["cpu", "cpu"]).double().eval()
    assert split.split and not one.split
    x = images.double()
    with torch.no_grad():
        expected = reference_forward(sd, x)
        torch.testing.assert_close(one(x), expected, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(split(x), expected, rtol=1e-9, atol=1e-9)
    # float32 too (different convolution calls, so not bit-identical in general).
    split32 = AlexNet.from_state_dict(grouped.state_dict(), devices=["cpu", "cpu"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(split32(images), grouped.eval()(images), rtol=1e-4, atol=1e-4)


def test_forms_agree_in_training_steps(images):
    """Train mode (dropout on, same seed), loss, gradients and two SGD steps with momentum agree; the
    optimiser state of one form loads into the other. In float64: the two forms sum in other orders,
    and float32 round-off (relative 1e-6 of a tensor's largest element) depends on the CPU's kernels."""
    labels = torch.tensor([3, 7])
    images = images.double()
    models = [_model(seed=5).double(), _model(seed=5, devices=["cpu", "cpu"]).double()]
    opts = [
        torch.optim.SGD(m.parameters(), lr=TC.BASE_LR, momentum=TC.MOMENTUM, weight_decay=TC.WEIGHT_DECAY)
        for m in models
    ]
    losses = []
    for model, opt in zip(models, opts, strict=True):
        torch.manual_seed(11)  # same dropout draws
        loss = F.cross_entropy(model.train()(images), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-12)
    grads = [{n: p.grad for n, p in m.named_parameters()} for m in models]
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-9, atol=1e-12, msg=name)
    # Resume the split form's optimiser in a fresh grouped model: the next step matches.
    resumed = AlexNet(num_classes=10).double()  # float64 before loading, so nothing is rounded
    resumed.load_state_dict(models[1].state_dict())
    resumed_opt = torch.optim.SGD(
        resumed.parameters(), lr=TC.BASE_LR, momentum=TC.MOMENTUM, weight_decay=TC.WEIGHT_DECAY
    )
    resumed_opt.load_state_dict(_round_trip(opts[1].state_dict()))  # a copy, as from a checkpoint file
    for model, opt in [(models[1], opts[1]), (resumed, resumed_opt)]:
        opt.zero_grad()
        torch.manual_seed(12)
        F.cross_entropy(model(images), labels).backward()
        opt.step()
    for (k, a), (k2, b) in zip(models[1].state_dict().items(), resumed.state_dict().items(), strict=True):
        assert k == k2
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=k)


def test_state_dict_portable_between_placements(grouped, images):
    split = AlexNet(num_classes=10, devices=["cpu", "cpu"])  # different (unseeded) weights
    sd = grouped.state_dict()
    assert {k: v.shape for k, v in split.state_dict().items()} == {k: v.shape for k, v in sd.items()}
    split.load_state_dict(sd)
    for k, v in split.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # And back, through a file read without unpickling arbitrary objects.
    back = AlexNet.from_state_dict(_round_trip(split.state_dict()))
    assert back.num_classes == 10
    with torch.no_grad():
        assert torch.equal(back.eval()(images), grouped.eval()(images))
    # The columns really hold the halves: column two of conv2 is kernels 128..255.
    assert torch.equal(split.conv2.columns[1].weight, sd["conv2.weight"][128:])
    assert torch.equal(split.fc6.columns[0].bias, sd["fc6.bias"][:2048])


def test_bad_state_dict_is_one_clear_error(grouped):
    sd = dict(grouped.state_dict())
    del sd["conv3.bias"]
    sd["fc6.weight"] = sd["fc6.weight"][:, :100]
    sd["extra"] = torch.zeros(1)
    with pytest.raises(AlexnetError, match=r"missing conv3.bias; unexpected extra; wrong shape fc6.weight"):
        AlexNet(num_classes=10).load_state_dict(sd)
    with pytest.raises(AlexnetError, match="fc8.weight"):
        AlexNet.from_state_dict({})


# --------------------------------------------------------------------------- §5 init, seeds, dropout


def test_init_statistics(grouped):
    for key, value in grouped.state_dict().items():
        layer, kind = key.split(".")
        if kind == "weight":
            assert value.mean().item() == pytest.approx(0.0, abs=5e-4), key
            assert value.std().item() == pytest.approx(TC.INIT_WEIGHT_STD, rel=0.03), key
        else:
            expected = 1.0 if layer in TC.INIT_BIAS_ONE_LAYERS else 0.0
            assert torch.all(value == expected), key
    assert {"conv2", "conv4", "conv5", "fc6", "fc7"} == set(TC.INIT_BIAS_ONE_LAYERS)


def test_same_seed_same_weights_and_output_in_any_placement(grouped, images):
    split = _model(devices=["cpu", "cpu"])
    for (k, a), b in zip(grouped.state_dict().items(), split.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    other = _model(seed=1)
    assert not torch.equal(other.state_dict()["conv1.weight"], grouped.state_dict()["conv1.weight"])
    outs = []
    for model in (grouped, _model()):
        torch.manual_seed(4)
        outs.append(model.train()(images))
    assert torch.equal(outs[0], outs[1])
    generator_init = AlexNet(num_classes=10)
    generator_init.reset_parameters(torch.Generator().manual_seed(0))
    assert torch.equal(generator_init.state_dict()["fc8.weight"], grouped.state_dict()["fc8.weight"])


def test_dropout_only_in_training(grouped, images):
    grouped.eval()
    with torch.no_grad():
        a, b = grouped(images), grouped(images)
    assert torch.equal(a, b)
    grouped.train()
    with torch.no_grad():
        c, d = grouped(images), grouped(images)
    assert not torch.equal(c, d)
    assert grouped.drop6.p == grouped.drop7.p == TC.DROPOUT_P
    grouped.eval()


def test_paper_dropout_masks_without_rescaling():
    """§4.2 / cuda-convnet2 dropout2: training zeroes about half and passes the rest unchanged (not x 2);
    evaluation multiplies every output by 0.5."""
    drop = PaperDropout()
    x = torch.rand(64, 4096, dtype=torch.float64) + 0.5
    torch.manual_seed(0)
    y = drop.train()(x)
    kept = y != 0
    assert torch.equal(y[kept], x[kept])  # kept outputs pass unchanged
    assert abs(kept.double().mean().item() - 0.5) < 0.01
    torch.testing.assert_close(drop.eval()(x), 0.5 * x, rtol=0, atol=0)
    # The expected training output equals the test-time output.
    torch.testing.assert_close(y.mean(), drop(x).mean(), rtol=0.01, atol=0)


def test_channels_last_and_bf16_autocast_forward(grouped, images):
    for devices in (None, ["cpu", "cpu"]):
        model = AlexNet.from_state_dict(grouped.state_dict(), devices=devices).eval()
        with torch.no_grad():
            reference = model(images)
            model = model.to(memory_format=torch.channels_last)
            assert model.conv2.columns[0].weight.is_contiguous(memory_format=torch.channels_last)
            x = images.contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(model(x), reference, rtol=1e-4, atol=1e-4)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = model(x)
        assert low.dtype == torch.bfloat16
        torch.testing.assert_close(low.float(), reference, rtol=0.05, atol=0.05 * reference.abs().max().item())


# --------------------------------------------------------------------------- devices


def test_placement_properties():
    assert _model().devices == [CPU]
    split = AlexNet(num_classes=3, devices=["cpu", torch.device("cpu")])
    assert split.devices == [CPU, CPU] and split.split
    assert split.input_device == split.output_device == CPU
    assert "split" in repr(split)


@pytest.mark.parametrize("devices", [[], ["cpu"] * 3, ["nonsense"]])
def test_bad_devices(devices):
    with pytest.raises(AlexnetError):
        AlexNet(num_classes=3, devices=devices)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is absent")
def test_cuda_device_without_cuda_is_clear_error():
    with pytest.raises(AlexnetError, match="CUDA is not available"):
        AlexNet(num_classes=3, devices=["cuda:0"])


@pytest.mark.gpu
@ONE_GPU
def test_gpu_forms_match_cpu(grouped, images):
    with torch.no_grad():
        expected = grouped.eval()(images)
    for devices in (["cuda:0"], ["cuda:0", "cuda:0"]):
        model = AlexNet.from_state_dict(grouped.state_dict(), devices=devices).eval()
        with torch.no_grad():
            out = model(images.cuda())
        assert out.device == torch.device("cuda:0")
        # TF32 convolutions/matmuls may be on: compare relative to the logits' scale.
        torch.testing.assert_close(out.cpu(), expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())


@pytest.mark.gpu
@TWO_GPUS
def test_two_gpu_split_matches_cpu(grouped, images):
    model = AlexNet.from_state_dict(grouped.state_dict(), devices=["cuda:0", "cuda:1"]).eval()
    assert model.conv2.columns[1].weight.device == torch.device("cuda:1")
    assert model.fc8.weight.device == torch.device("cuda:0")
    with torch.no_grad():
        out = model(images.cuda(0))
        expected = grouped.eval()(images)
    assert out.device == torch.device("cuda:0")
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())
    assert AlexNet.from_state_dict(model.state_dict()).state_dict().keys() == grouped.state_dict().keys()
