"""The DALI pipeline on the CPU (DALI's CPU-only mode), checked against plain numpy re-implementations."""

from __future__ import annotations

import io
from dataclasses import dataclass, fields

import numpy as np
import pytest
import torch
from _writers import write_split
from click.testing import CliRunner
from PIL import Image

from alexnet.pipeline import artifacts as A
from alexnet.pipeline import columns as K
from alexnet.pipeline import constants as C
from alexnet.pipeline import order as O
from alexnet.pipeline.dali_pipeline import TEN_CROP_ORDER, lighting_scale_values
from alexnet.pipeline.errors import AlexnetError, ContractError
from alexnet.pipeline.loader import DataConfig, create_loader
from alexnet.pipeline.order import epoch_order
from alexnet.tools.cli import main as prep

N_TRAIN, N_VAL, N_CLASSES = 24, 10, 4
EIGVEC = np.linalg.qr(np.random.default_rng(3).normal(size=(3, 3)))[0]
EIGVAL = np.array([900.0, 120.0, 25.0])


def _jpeg(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _write_split(root, split, images, labels, num_shards):
    # Identity order (seed=None): position == index, so a record's label and pixels are recoverable.
    records = [(f"x/{k}.JPEG", _jpeg(img), lab) for k, (img, lab) in enumerate(zip(images, labels, strict=True))]
    return write_split(root, split, records, num_shards, seed=None, map_size=1 << 26)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:256, 0:256]

    def image(k):
        base = np.stack([xx, yy, (xx + yy) // 2], -1) + rng.integers(0, 60, 3)
        return np.clip(base + k, 0, 255).astype(np.uint8)

    train = [image(k) for k in range(N_TRAIN)]
    val = [image(100 + k) for k in range(N_VAL)]
    manifest = A.Manifest(
        classes=[f"n{i:08d}" for i in range(N_CLASSES)],
        splits={
            "train": _write_split(root, "train", train, [k % N_CLASSES for k in range(N_TRAIN)], 3),
            "val": _write_split(root, "val", val, [k % N_CLASSES for k in range(N_VAL)], 1),
        },
    )
    A.write_manifest(root, manifest)
    mean_image = rng.uniform(60, 200, (256, 256, 3)).astype(np.float32)
    stats = A.Stats(
        mean_rgb=[120.0, 115.0, 100.0],
        eigval=EIGVAL.tolist(),
        eigvec=EIGVEC.tolist(),
        n_images=N_TRAIN,
        n_pixels=N_TRAIN * 65536,
    )
    A.write_stats(root, stats, mean_image)
    return root


def _loader(
    root,
    split,
    batch_size,
    *,
    seed=0,
    rank=0,
    world=1,
    device="cpu",
    dtype="float32",
    ten_crop=False,
    with_draws=False,
    channels_last=False,
    **data,
):
    """A loader with one DALI thread and the reads on this thread unless told (the 2-core CI machine;
    spawning reader processes costs ~2 s a loader, and they deliver the same bits: test below)."""
    cfg = DataConfig(**{"num_threads": 1, "workers": 0, **data})
    return create_loader(
        root,
        split,
        cfg,
        batch_size=batch_size,
        seed=seed,
        rank=rank,
        world=world,
        device=device,
        dtype=dtype,
        channels_last=channels_last,
        ten_crop=ten_crop,
        with_draws=with_draws,
    )


def _decoded(root, split):
    """The raw records decoded by DALI's CPU decoder (the pipeline's decoder), in key order."""
    from nvidia.dali import fn, pipeline_def, types

    paths = [str(p) for p in A.read_manifest(root).shard_paths(root, split)]
    n = A.read_manifest(root).splits[split].num_records

    @pipeline_def(batch_size=n, num_threads=1, device_id=None)
    def pipe():
        jpegs, labels = fn.readers.caffe(path=paths, random_shuffle=False)
        return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB), labels

    p = pipe()
    p.build()
    imgs, labels = p.run()
    return np.stack([np.array(imgs.at(i)) for i in range(n)]), np.array(labels.as_tensor()).reshape(-1)


def _reference(raw, mean_image, xy, mirror, alpha, s):
    """§2/§4.1 in plain numpy: (record - mean image) + eigvec @ (alpha * s), cut at (x, y), mirrored."""
    x, y = (int(v) for v in xy)
    ref = raw.astype(np.float64) - mean_image  # §2 mean image
    ref = ref + EIGVEC @ (np.asarray(alpha, dtype=np.float64) * s)  # §4.1 lighting, every pixel
    ref = ref[y : y + 224, x : x + 224]  # crop at (x, y)
    return ref[:, ::-1] if mirror else ref


def test_preview_matches_numpy_reimplementation(data, tmp_path):
    """Every preview image equals a numpy re-implementation of §2/§4.1 applied to the raw record."""
    out = tmp_path / "p.npz"
    r = CliRunner().invoke(
        prep, ["preview", "--data-dir", str(data), "--split", "train", "--n", "12", "--seed", "5", "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert out.with_suffix(".png").exists()
    z = np.load(out)
    raw, raw_labels = _decoded(data, "train")
    mean_image = A.read_mean_image(data).astype(np.float64)
    assert z["images"].shape == (12, 3, 224, 224) and z["images"].dtype == np.float32
    assert z["index"].tolist() == epoch_order(N_TRAIN, 5, 0)[:12].tolist()  # epoch 0's order (identity positions)
    assert len({tuple(v) for v in z["crop_xy"]}) > 6 and 0 < z["mirror"].sum() < 12  # real draws
    for i in range(12):
        k = int(z["index"][i])
        ref = _reference(raw[k], mean_image, z["crop_xy"][i], z["mirror"][i], z["alpha"][i], np.sqrt(EIGVAL))
        assert z["labels"][i] == raw_labels[k]
        np.testing.assert_allclose(z["images"][i].transpose(1, 2, 0), ref, atol=1e-3)


def test_region_decode_path_matches_numpy_reimplementation(data):
    """``roi_decode`` (decode only the crop window; mean patch cut apart) computes the same function."""
    raw, _ = _decoded(data, "train")
    mean_image = A.read_mean_image(data).astype(np.float64)
    images, _labels, d = next(iter(_loader(data, "train", 8, with_draws=True, roi_decode=True, seed=3)))
    for i in range(8):
        ref = _reference(
            raw[d["index"][i]], mean_image, d["crop_xy"][i], d["mirror"][i], d["alpha"][i], np.sqrt(EIGVAL)
        )
        np.testing.assert_allclose(images[i].numpy().transpose(1, 2, 0), ref, atol=1e-3)


def test_lighting_shift_is_eigvec_alpha_s_exactly(data):
    """With a flat mean (channel mode) the per-image shift is exactly eigvec @ (alpha * s)."""
    raw, _ = _decoded(data, "train")
    for scale in C.LIGHTING_SCALES:
        loader = _loader(data, "train", 8, with_draws=True, mean="channel", lighting_scale=scale)
        images, _labels, draws = next(iter(loader))
        s = lighting_scale_values(EIGVAL, scale)
        for i in range(8):
            x, y = draws["crop_xy"][i]
            crop = raw[draws["index"][i], y : y + 224, x : x + 224].astype(np.float64)
            if draws["mirror"][i]:
                crop = crop[:, ::-1]
            shift = images[i].numpy().transpose(1, 2, 0).astype(np.float64) - (crop - [120.0, 115.0, 100.0])
            expect = EIGVEC @ (draws["alpha"][i].astype(np.float64) * s)
            np.testing.assert_allclose(shift, np.broadcast_to(expect, shift.shape), atol=1e-3)


def test_flip_rate_and_alpha_distribution(data):
    loader = _loader(data, "train", 8, with_draws=True, seed=1)
    mirrors, alphas = [], []
    for _ in range(12):
        for _images, _labels, draws in loader:
            mirrors.append(draws["mirror"])
            alphas.append(draws["alpha"])
    m = np.concatenate(mirrors)
    a = np.concatenate(alphas)
    assert len(m) == 12 * 24
    assert abs(m.mean() - 0.5) < 4 * 0.5 / np.sqrt(len(m))
    assert abs(a.std() - C.LIGHTING_STD) < 0.02 and abs(a.mean()) < 0.03


def test_each_epoch_is_its_own_permutation(data):
    loader = _loader(data, "train", 8, with_draws=True, seed=2)
    assert len(loader) == 3 and loader.num_records == N_TRAIN
    epochs = []
    for epoch in range(3):
        index = np.concatenate([d["index"] for _x, _y, d in loader])
        assert sorted(index.tolist()) == list(range(N_TRAIN))  # every record once (24 = 3 full batches)
        assert index.tolist() == epoch_order(N_TRAIN, 2, epoch).tolist()
        epochs.append(index.tolist())
    assert epochs[0] != epochs[1] != epochs[2] and loader.epoch == 3


def _delivered(loader) -> list[list[int]]:
    return [d["index"].tolist() for _x, _y, d in loader]


@pytest.mark.parametrize("split", ["val", "train"])
@pytest.mark.parametrize("world,batch_size", [(1, 5), (2, 3), (3, 3), (3, 4)])
def test_replica_shares_disjoint_and_complete(data, split, world, batch_size):
    """Strided shares of the epoch's order; uneven sizes included (val: 10 = 4 + 3 + 3 over 3)."""
    n = N_VAL if split == "val" else N_TRAIN
    order = np.arange(n) if split == "val" else epoch_order(n, 7, 1)
    shares = []
    for rank in range(world):
        loader = _loader(data, split, batch_size, seed=7, rank=rank, world=world, with_draws=True)
        loader.reset()  # epoch 1
        batches = _delivered(loader)
        flat = [i for b in batches for i in b]
        assert flat == order[rank::world][: len(flat)].tolist()
        shares.append(flat)
    lengths = {len(s) for s in shares}
    seen = sorted(i for s in shares for i in s)
    assert len(seen) == len(set(seen))  # disjoint
    if split == "val":
        assert seen == list(range(N_VAL))  # every record exactly once over the replicas
    else:  # the same number of full batches everywhere; only the final global partial batch is dropped
        steps = n // (world * batch_size)
        assert lengths == {steps * batch_size} and seen == sorted(order[: steps * world * batch_size].tolist())


@pytest.mark.parametrize("split", ["val", "train"])
def test_pipelines_deliver_the_same_stream_and_draws(data, split):
    """Pipeline j prepares batches j, j + K, ...: the images, labels and draws of each (seed, epoch,
    record) are the same with 1, 2 and 3 pipelines (bitwise on the CPU)."""

    def run(k):
        loader = _loader(data, split, 4, seed=3, pipelines=k, with_draws=True)
        return [b for _ in range(2) for b in loader]

    one = run(1)
    assert len(one) == (2 * 3 if split == "val" else 2 * 6)
    for k in (2, 3):
        for (x1, y1, d1), (xk, yk, dk) in zip(one, run(k), strict=True):
            assert torch.equal(x1, xk) and torch.equal(y1, yk)
            assert d1.keys() == dk.keys() and all(np.array_equal(d1[key], dk[key]) for key in d1)


@pytest.mark.parametrize("split", ["train", "val"])
def test_reader_processes_deliver_bitwise_what_the_training_thread_reads(data, split):
    """``workers`` moves the LMDB reads and the record parsing into DALI's reader processes and changes
    nothing delivered: the same images, labels, positions and draws as ``workers=0`` (in the thread),
    over two epochs, with 1 and 2 reader processes and 2 pipelines."""

    def run(workers, pipelines=1):
        loader = _loader(data, split, 4, seed=3, workers=workers, pipelines=pipelines, with_draws=True)
        return [b for _ in range(2) for b in loader]

    ref = run(0)
    assert len(ref) == (2 * 3 if split == "val" else 2 * 6)
    for workers, pipelines in [(1, 1), (2, 2)]:
        for (x0, y0, d0), (x, y, d) in zip(ref, run(workers, pipelines), strict=True):
            assert torch.equal(x0, x) and torch.equal(y0, y)
            assert d0.keys() == d.keys() and all(np.array_equal(d0[key], d[key]) for key in d0)


def test_val_centre_and_ten_patch_geometry(data):
    raw, raw_labels = _decoded(data, "val")
    mean_image = A.read_mean_image(data).astype(np.float64)
    centre = _loader(data, "val", 4)
    ten = _loader(data, "val", 4, ten_crop=True)
    assert len(centre) == 3  # 4 + 4 + 2: every val image exactly once
    imgs_c = torch.cat([x for x, _ in centre]).numpy()
    batches = list(ten)
    imgs_t = torch.cat([x for x, _ in batches]).numpy()
    labels = torch.cat([y for _, y in batches]).numpy()
    assert imgs_c.shape == (N_VAL, 3, 224, 224) and imgs_t.shape == (N_VAL, 10, 3, 224, 224)
    assert labels.tolist() == raw_labels.tolist()
    offsets = {
        "top-left": (0, 0),
        "top-right": (32, 0),
        "bottom-left": (0, 32),
        "bottom-right": (32, 32),
        "centre": (16, 16),
    }
    for k in range(N_VAL):
        full = raw[k].astype(np.float64) - mean_image
        np.testing.assert_allclose(imgs_c[k].transpose(1, 2, 0), full[16:240, 16:240], atol=1e-3)
        for j, (name, mirror) in enumerate(TEN_CROP_ORDER):
            x, y = offsets[name]
            ref = full[y : y + 224, x : x + 224]
            ref = ref[:, ::-1] if mirror else ref
            np.testing.assert_allclose(imgs_t[k, j].transpose(1, 2, 0), ref, atol=1e-3)


def test_same_seed_same_batch_other_seed_other_batch(data):
    def first(seed):
        return next(iter(_loader(data, "train", 8, num_threads=2, seed=seed)))[0]

    a, b, c = first(4), first(4), first(5)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_save_restore_mid_epoch_gives_the_identical_next_batch(data):
    loader = _loader(data, "train", 8, num_threads=2, seed=9)
    stream = []
    state = None
    for epoch in range(2):
        for i, (images, labels) in enumerate(loader):
            if epoch == 1 and i == 1:
                state = loader.state_dict()
            stream.append((epoch, i, images, labels))
    assert state == {
        "version": 2,
        "epoch": 1,
        "consumed": 16,
        "seed": 9,
        "split": "train",
        "batch_size": 8,
        "shuffle": "global",
        "replicas": 1,
    }
    torch.save(state, "/dev/null")  # plain types: checkpoints can hold it
    resumed = _loader(data, "train", 8, num_threads=2, seed=9)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == 1 and resumed.epoch == 2
    assert torch.equal(rest[0][0], stream[-1][2]) and torch.equal(rest[0][1], stream[-1][3])
    # ...and the epoch after it goes on identically too.
    nxt = next(iter(resumed))[0]
    assert torch.equal(nxt, next(iter(loader))[0])


def _job(data, world, batch_size, state=None, steps=None, **kw):
    """``world`` replicas stepping together (from ``state``): each step's images, labels and draws, rank
    after rank, and the state after ``steps`` steps (None: the epoch's end)."""
    loaders = [
        _loader(data, "train", batch_size, seed=4, rank=r, world=world, with_draws=True, **kw) for r in range(world)
    ]
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(state)
    out = []
    for step, batches in enumerate(zip(*loaders, strict=True)):
        out.extend(batches)
        if steps is not None and step + 1 == steps:
            break
    states = [loader.state_dict() for loader in loaders]
    assert all(s == states[0] for s in states)  # identical on every replica
    return out, states[0]


@pytest.mark.parametrize("pipelines", [1, 2])
def test_resume_with_another_replica_or_pipeline_count_continues_the_permutation(data, pipelines):
    """Global batch 6: 2 replicas x 3 for two steps, then 3 replicas x 2 (or 1 x 6) to the epoch's end:
    the records are the uninterrupted epoch's, none repeated or skipped, with the same draws."""
    full, end = _job(data, 1, 6)
    first, state = _job(data, 2, 3, steps=2, pipelines=pipelines, workers=pipelines - 1)  # and reader processes
    assert state["consumed"] == 12 and state["replicas"] == 2
    for world in (3, 1):
        rest, end2 = _job(data, world, 6 // world, state=state, pipelines=3 - pipelines)
        assert (end2["epoch"], end2["consumed"], end["epoch"], end["consumed"]) == (1, 0, 1, 0)
        got = {int(i): (x, y, d) for xs, ys, ds in first + rest for x, y, i, d in _rows(xs, ys, ds)}
        want = {int(i): (x, y, d) for xs, ys, ds in full for x, y, i, d in _rows(xs, ys, ds)}
        assert sorted(got) == sorted(want) == list(range(N_TRAIN))
        assert len(got) == sum(len(ds["index"]) for _x, _y, ds in first + rest)  # no record twice
        for i, (x, y, d) in want.items():
            assert torch.equal(got[i][0], x) and got[i][1] == y and got[i][2] == d  # bitwise on the CPU


def _rows(images, labels, draws):
    for j, i in enumerate(draws["index"]):
        row = (
            int(draws["crop_xy"][j][0]),
            int(draws["crop_xy"][j][1]),
            int(draws["mirror"][j]),
            tuple(draws["alpha"][j].tolist()),
        )
        yield images[j], int(labels[j]), i, row


def test_mismatched_states_are_refused_in_one_line(data):
    loader = _loader(data, "train", 4, seed=4)
    next(iter(loader))
    state = loader.state_dict()
    _loader(data, "train", 4, seed=4, roi_decode=True, pipelines=2).load_state_dict(state)  # other forms: fine
    for other, what in [
        (_loader(data, "train", 4, seed=5), "seed"),
        (_loader(data, "train", 8, seed=4), "batch_size"),
        (_loader(data, "train", 4, seed=4, shuffle="buffer"), "shuffle"),
        (_loader(data, "val", 4, seed=4), "split"),
    ]:
        with pytest.raises(AlexnetError, match=f"'{what}'"):
            other.load_state_dict(state)
    with pytest.raises(AlexnetError, match="restart the run") as e:
        _loader(data, "train", 4, seed=4).load_state_dict({**state, "version": 3})
    assert "\n" not in str(e.value)
    with pytest.raises(AlexnetError, match="not possible here"):  # nvJPEG without a GPU: said at once
        next(iter(_loader(data, "train", 4, decoder="mixed")))


def test_buffer_shuffle_reads_the_replicas_parts_and_replays_on_resume(data):
    """shuffle="buffer": the caffe reader over each replica's contiguous part, another order each
    epoch; a resume with the same replica count replays to the same next batch, another restarts."""
    parts = []
    for rank in range(2):
        loader = _loader(data, "train", 4, seed=1, rank=rank, world=2, shuffle="buffer", with_draws=True)
        assert len(loader) == 3
        epochs = [[i for b in _delivered(loader) for i in b] for _ in range(2)]
        part = set(range(12 * rank, 12 * (rank + 1)))
        assert all(sorted(e) == sorted(part) for e in epochs) and epochs[0] != epochs[1]
        parts.append(part)
    loader = _loader(data, "train", 4, seed=1, shuffle="buffer", with_draws=True)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    want = [(x, d["index"].tolist()) for x, _y, d in it]
    resumed = _loader(data, "train", 4, seed=1, shuffle="buffer", with_draws=True)
    resumed.load_state_dict(state)
    got = [(x, d["index"].tolist()) for x, _y, d in resumed]
    assert len(got) == len(want) == 5
    assert all(torch.equal(a, c) and b == e for (a, b), (c, e) in zip(got, want, strict=True))
    other = _loader(data, "train", 2, seed=1, world=2, shuffle="buffer")
    other.load_state_dict(state)
    assert other.consumed == 0 and "restarts" in other.note


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_outputs_round_the_float32_batch(data, dtype):
    def first(dt):
        return next(iter(_loader(data, "train", 4, dtype=dt, seed=8)))[0]

    x, ref = first(dtype), first("float32")
    assert x.dtype == getattr(torch, dtype) and x.shape == (4, 3, 224, 224)
    # The float32 result rounded once: bfloat16 by torch (exact), float16 by DALI (within one unit in the last place).
    ulp = 2.0**-10 if dtype == "float16" else 0.0
    torch.testing.assert_close(x.float(), ref.to(x.dtype).float(), rtol=ulp, atol=ulp)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_channels_last_delivery_is_a_view_of_the_same_batch(data, dtype):
    """channels_last: DALI writes HWC and the loader views it as NCHW (channels_last memory, no copy):
    the same values as the NCHW-contiguous delivery, in every dtype, for train, centre and ten patches;
    the ten patches still reshape to [10 B, 3, 224, 224] as the evaluator does."""
    cases = [("train", {}), ("val", {}), ("val", {"ten_crop": True})]
    for split, kw in cases:
        (x, y), (xc, yc) = (
            next(iter(_loader(data, split, 4, dtype=dtype, seed=8, channels_last=c, roi_decode=c, **kw)))
            for c in (False, True)
        )
        assert xc.shape == x.shape and xc.dtype == x.dtype == getattr(torch, dtype) and torch.equal(y, yc)
        assert x.is_contiguous() and not xc.is_contiguous()
        flat = xc.reshape(-1, 3, 224, 224)
        assert flat.is_contiguous(memory_format=torch.channels_last) and flat.data_ptr() == xc.data_ptr()
        # train: roi_decode's float32 differs in the last bits, which a half type may round one step apart
        ulp = {"float32": 0.0, "float16": 2.0**-10, "bfloat16": 2.0**-7}[dtype] if split == "train" else 0.0
        torch.testing.assert_close(xc.float(), x.float(), rtol=ulp, atol=1e-3 if split == "train" else 0.0)


def test_the_bfloat16_cast_writes_into_the_steps_static_input(data):
    """loader.static_input (the trainer gives its step's): where it gives a tensor, the one cast from
    DALI's float32 writes the batch there (a CUDA graph's input: no second pass), the same bits as the
    cast into a fresh tensor; where it gives None the cast makes its own; a wrong target is refused."""
    plain = list(_loader(data, "train", 4, dtype="bfloat16", seed=8, channels_last=True))
    buffer = torch.empty(4, 3, 224, 224, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    asked = []

    def static_input(shape):
        asked.append(shape)
        return buffer if len(asked) % 2 else None  # every other batch, as a step between captures does

    loader = _loader(data, "train", 4, dtype="bfloat16", seed=8, channels_last=True)
    loader.static_input = static_input
    for k, ((x, y), (x0, y0)) in enumerate(zip(loader, plain, strict=True)):
        assert (x is buffer) == (k % 2 == 0) and x.is_contiguous(memory_format=torch.channels_last)
        assert x.dtype == torch.bfloat16 and torch.equal(x, x0) and torch.equal(y, y0)
    assert asked == [(4, 3, 224, 224)] * len(plain)
    loader.static_input = lambda shape: torch.empty(shape, dtype=torch.float16)
    with pytest.raises(ValueError, match="static_input gave torch.float16"):
        next(iter(loader))


@pytest.mark.gpu
def test_gpu_batches_survive_dali_running_ahead_of_a_busy_stream(data):
    """pipe.run(stream): the host does not wait for DALI, so a batch's buffer must outlive the work the
    stream still has queued on it. Each batch is read only after a long sleep on the stream, with
    nothing on the host keeping it but the loader, while DALI (prefetch 3, two pipelines) runs ahead:
    the copies equal those of a loader whose every batch is synchronised at once."""
    kw = dict(num_threads=2, device="cuda:0", pipelines=2, prefetch=3, seed=6)
    want = []
    for x, y in _loader(data, "train", 4, **kw):
        torch.cuda.synchronize()
        want.append((x.clone(), y.clone()))
    got = []
    for x, y in _loader(data, "train", 4, **kw):
        torch.cuda._sleep(50_000_000)  # ~25 ms of the GPU's clock before the stream reads the batch
        got.append((x.mul(1.0), y.add(0)))  # read on the stream, after the sleep; x and y dropped here
    torch.cuda.synchronize()
    for (x, y), (x0, y0) in zip(got, want, strict=True):
        assert torch.equal(x, x0) and torch.equal(y, y0)


@pytest.fixture(scope="module")
def corrupt(data, tmp_path_factory):
    """A copy of the dataset with garbage in place of the JPEG of one train and one val record (through LMDB)."""
    import shutil

    from _train_fixtures import garble_record

    root = tmp_path_factory.mktemp("corrupt") / "data"
    shutil.copytree(data, root)
    return root, {split: garble_record(root, split, shard, 2) for split, shard in (("train", 1), ("val", 0))}


@pytest.mark.parametrize("split,ten_crop,workers", [("train", False, 0), ("train", False, 1), ("val", True, 0)])
def test_a_corrupt_record_is_named_in_one_line(corrupt, split, ten_crop, workers):
    """DALI fails on the batch; the loader checks that batch's records (and the ones DALI read ahead)
    with PIL and names the shard, the key and the command that checks the whole dataset."""
    root, keys = corrupt
    loader = _loader(root, split, 4, ten_crop=ten_crop, workers=workers, prefetch=2)
    with pytest.raises(AlexnetError) as e:
        for _ in range(2):
            list(loader)
    text = str(e.value)
    assert keys[split] in text and f"{split}-0000" in text and "alexnet-prep verify" in text and "\n" not in text


def test_bad_inputs_are_clear_errors(data, tmp_path):
    with pytest.raises(AlexnetError, match="ten_crop"):
        _loader(data, "train", 8, ten_crop=True)
    with pytest.raises(AlexnetError, match="rank 2"):
        _loader(data, "train", 8, rank=2, world=2)
    with pytest.raises(AlexnetError, match="fewer than one batch"):
        _loader(data, "train", 13, world=2)
    for bad in [{"shuffle": "window"}, {"pipelines": -1}, {"decoder": "gpu"}, {"hw_decoder_load": 2.0}]:
        with pytest.raises(AlexnetError):
            DataConfig(**bad)
    with pytest.raises(ContractError, match="no dataset"):
        _loader(tmp_path, "train", 8)
    r = CliRunner().invoke(prep, ["preview", "--data-dir", str(data), "--n", "100", "--out", str(tmp_path / "x.npz")])
    assert r.exit_code == 1 and "fewer than --n 100" in r.output


def test_bench_pipeline_cli(data):
    r = CliRunner().invoke(prep, ["bench-pipeline", "--data-dir", str(data), "--batches", "3", "--batch-size", "8"])
    assert r.exit_code == 0, r.output
    assert "images/s" in r.output and "(global shuffle)" in r.output and "1 pipeline(s)" in r.output
    args = ["bench-pipeline", "--data-dir", str(data), "--batches", "3", "--batch-size", "4", "--pipelines", "2"]
    r = CliRunner().invoke(prep, args)
    assert r.exit_code == 0 and f"2 pipeline(s) of {DataConfig().num_threads} threads" in r.output, r.output
    r = CliRunner().invoke(prep, [*args, "--shuffle", "buffer"])
    assert r.exit_code == 0 and "(buffer shuffle)" in r.output and "1 pipeline(s)" in r.output, r.output


def test_order_cli_prints_what_the_loader_delivers(data):
    for split, epoch, rank, world in [("train", 2, 1, 3), ("train", 0, 0, 1), ("val", 1, 0, 2)]:
        args = [
            "order",
            "--data-dir",
            str(data),
            "--split",
            split,
            "--epoch",
            str(epoch),
            "--seed",
            "6",
            "--replica",
            str(rank),
            "--replicas",
            str(world),
            "--batch-size",
            str(2 * world),
        ]
        r = CliRunner().invoke(prep, args)
        assert r.exit_code == 0, r.output
        loader = _loader(data, split, 2, seed=6, rank=rank, world=world, with_draws=True)
        loader.load_state_dict({**loader.state_dict(), "epoch": epoch})
        assert [int(v) for v in r.output.split()] == [i for b in _delivered(loader) for i in b]
    r = CliRunner().invoke(prep, ["order", "--data-dir", str(data), "--replica", "2", "--replicas", "2"])
    assert r.exit_code == 1 and "replica 2 is not in [0, 2)" in r.output


def test_batches_stay_valid_after_the_loader_moves_on(data):
    """Batches are handed over without a copy (DLPack): DALI must not reuse their memory later."""
    loader = _loader(data, "train", 8, num_threads=2, seed=6, prefetch=2)
    kept = [(x, y, x.clone(), y.clone()) for _ in range(3) for x, y in loader]  # 3 epochs, 9 batches alive
    for x, y, x0, y0 in kept:
        assert torch.equal(x, x0) and torch.equal(y, y0)
    assert len({float(x.sum()) for x, *_ in kept}) == len(kept)


@pytest.mark.gpu
@pytest.mark.parametrize("roi_decode", [False, True])
def test_gpu_train_batch_matches_numpy_reimplementation(data, roi_decode):
    """The GPU path ("mixed" nvJPEG decoder, GPU crop/normalise) computes the same function; the
    tolerance covers nvJPEG vs libjpeg-turbo decoding differences only."""
    raw, raw_labels = _decoded(data, "train")
    mean_image = A.read_mean_image(data).astype(np.float64)
    loader = _loader(data, "train", 8, num_threads=2, with_draws=True, device="cuda:0", seed=5, roi_decode=roi_decode)
    images, labels, d = next(iter(loader))
    cpu = next(iter(_loader(data, "train", 8, with_draws=True, seed=5)))[2]
    assert all(np.array_equal(d[key], cpu[key]) for key in d)  # the same draws on the CPU and the GPU
    assert images.is_cuda and labels.is_cuda and labels.dtype == torch.int64 and images.shape == (8, 3, 224, 224)
    assert labels.cpu().tolist() == raw_labels[d["index"]].tolist()
    for i in range(8):
        ref = _reference(
            raw[d["index"][i]], mean_image, d["crop_xy"][i], d["mirror"][i], d["alpha"][i], np.sqrt(EIGVAL)
        )
        assert np.abs(images[i].cpu().numpy().transpose(1, 2, 0) - ref).mean() < 1.0


@pytest.mark.gpu
def test_gpu_ten_patch_and_float16(data):
    cpu = torch.cat([x for x, _ in _loader(data, "val", 4, ten_crop=True)])
    gpu_loader = _loader(data, "val", 4, ten_crop=True, device="cuda:0", dtype="float16")
    gpu = torch.cat([x for x, _ in gpu_loader])
    assert gpu.is_cuda and gpu.dtype == torch.float16 and gpu.shape == (N_VAL, 10, 3, 224, 224)
    assert (gpu.float().cpu() - cpu).abs().mean() < 1.0


@pytest.mark.gpu
def test_gpu_two_pipelines_feed_a_graphed_step_while_dali_prefetches(data):
    """The CUDA-graph capture happens while DALI's threads decode the next batches (a "global"
    capture fails then: found on the H100); two GPU pipelines take turns over the records."""
    from alexnet.trainer.model import AlexNet
    from alexnet.trainer.optim import create_optimizer
    from alexnet.trainer.step import GraphedStep

    dev = torch.device("cuda:0")
    loader = _loader(data, "train", 4, num_threads=2, device="cuda:0", pipelines=2, prefetch=3, with_draws=True, seed=2)
    model = AlexNet(num_classes=N_CLASSES, devices=[dev]).train()
    step = GraphedStep(model, create_optimizer(model, 0.01, 0.9, 5e-4), precision="bf16", eager_steps=1)
    losses, seen = [], []
    for _ in range(2):
        for images, labels, draws in loader:
            assert images.is_cuda and labels.is_cuda
            losses.append(float(step(images, labels)))
            seen.extend(int(i) for i in draws["index"])
    assert step.captures == 1 and len(losses) == 2 * len(loader) == 12
    assert all(np.isfinite(losses))
    assert seen[: len(seen) // 2] == epoch_order(N_TRAIN, 2, 0).tolist()  # 24 records = 6 batches of 4


@pytest.mark.gpu
def test_gpu_graphed_bf16_step_reads_the_batch_the_loader_cast_into_its_input(data):
    """The trainer's wiring under bf16 (loader.static_input = step.static_input): once the graph is
    captured each batch arrives in the graph's own input buffer (one cast, no copy) with the bits a
    plain cast gives, and the steps' losses equal those of the same step fed plain casts."""
    from alexnet.trainer.model import AlexNet
    from alexnet.trainer.optim import create_optimizer
    from alexnet.trainer.step import GraphedStep

    dev = torch.device("cuda:0")
    kw = dict(num_threads=2, device="cuda:0", dtype="bfloat16", channels_last=True, seed=2)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    runs = []
    for wired in (False, True):
        torch.manual_seed(0)
        torch.cuda.manual_seed(0)
        model = AlexNet(num_classes=N_CLASSES, devices=[dev]).to(memory_format=torch.channels_last).train()
        step = GraphedStep(model, create_optimizer(model, 0.01, 0.9, 5e-4), precision="bf16", eager_steps=1)
        loader, plain = _loader(data, "train", 4, **kw), _loader(data, "train", 4, **kw)
        if wired:
            loader.static_input = step.static_input
        losses, direct = [], 0
        for (x, y), (x0, _) in zip(loader, plain, strict=True):
            assert torch.equal(x, x0)
            direct += x is step._x
            losses.append(float(step(x, y)))
        runs.append((losses, direct))
    (plain_losses, none), (wired_losses, direct) = runs
    assert none == 0 and direct == len(wired_losses) - 2 == N_TRAIN // 4 - 2  # after the warm-up and the capture
    assert wired_losses == plain_losses


def test_preview_val_centre_crops_in_key_order(data, tmp_path):
    out = tmp_path / "v.npz"
    r = CliRunner().invoke(prep, ["preview", "--data-dir", str(data), "--split", "val", "--n", "4", "--out", str(out)])
    assert r.exit_code == 0, r.output
    z = np.load(out)
    assert sorted(z.files) == ["images", "index", "labels"]
    raw, raw_labels = _decoded(data, "val")
    centre = raw[:4, 16:240, 16:240].astype(np.float64) - A.read_mean_image(data)[16:240, 16:240]
    assert z["index"].tolist() == [0, 1, 2, 3] and z["labels"].tolist() == raw_labels[:4].tolist()
    np.testing.assert_allclose(z["images"].transpose(0, 2, 3, 1), centre, atol=1e-3)
    assert Image.open(out.with_suffix(".png")).size[0] > 4 * 224


# --------------------------------------------------------------------------- named columns


@pytest.mark.parametrize(
    "dummy",
    [K.Column("dummy", (2,), "float32", draw=True), K.Column("dummy", (), "int32", draw=True)],
    ids=["float-pair", "int"],
)
def test_a_column_defined_in_one_place_reaches_the_delivered_batch(data, monkeypatch, dummy):
    """A draw added as one ``Column`` (pipeline/columns.py) beside its values (an ``order.Draws``
    field) travels through the source, DALI's graph and the loader to ``draws``, and changes none of
    the other columns or images."""
    plain = list(_loader(data, "train", 4, seed=4, with_draws=True))
    real = O.epoch_draws

    @dataclass(frozen=True)
    class Draws(O.Draws):
        dummy: np.ndarray

    def values(num_positions: int) -> np.ndarray:
        grid = np.arange(num_positions * dummy.width).reshape(num_positions, *dummy.shape)
        return (grid * 3 + (0.5 if dummy.carrier == "float32" else 1)).astype(dummy.dtype)

    def epoch_draws(num_positions: int, seed: int, epoch: int) -> Draws:
        return Draws(**vars(real(num_positions, seed, epoch)), dummy=values(num_positions))

    monkeypatch.setattr(O, "epoch_draws", epoch_draws)
    monkeypatch.setattr(K, "COLUMNS", (*K.COLUMNS, dummy))
    extended = list(_loader(data, "train", 4, seed=4, with_draws=True))
    assert len(extended) == len(plain) == N_TRAIN // 4
    for (x, y, d), (x0, y0, d0) in zip(extended, plain, strict=True):
        assert torch.equal(x, x0) and torch.equal(y, y0) and list(d) == [*d0, "dummy"]
        for name, want in d0.items():
            assert d[name].dtype == want.dtype and np.array_equal(d[name], want), name
        assert d["dummy"].dtype == np.dtype(dummy.dtype)
        assert np.array_equal(d["dummy"], values(N_TRAIN)[d["index"]])


def test_every_draw_has_its_column_and_a_column_is_packed_by_its_shape():
    assert [c.name for c in K.COLUMNS if c.draw] == [f.name for f in fields(O.Draws)]
    train, val = K.batch_columns(True), K.batch_columns(False)
    assert [c.name for c in val] == ["length", "label", "index"] and K.output_names(val) == ("label", "index")
    assert K.carriers(val) == ("int64",) and K.carriers(train) == ("int64", "float32")
    assert K.layout(train) == {
        "length": (0, 0),
        "label": (0, 1),
        "index": (0, 2),
        "crop_xy": (0, 3),
        "mirror": (0, 5),
        "alpha": (1, 0),
    }
    values = {"length": np.array([5, 6]), "label": np.array([1, 2]), "index": np.array([7, 9])}
    (ints,) = K.pack(val, values)
    assert ints.dtype == np.int64 and ints.tolist() == [[5, 1, 7], [6, 2, 9]]
    with pytest.raises(ValueError, match="'label' has 2 values per record"):
        K.pack(val, {**values, "label": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="float64"):
        K.Column("x", dtype="float64")
