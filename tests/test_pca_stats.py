"""alexnet-prep pca-stats: exact mean image and RGB PCA against a direct numpy computation.

Datasets are written directly through the data contract (LMDB shards of Datum records of PIL-encoded
JPEGs); the references decode the same stored JPEGs with PIL and compute over all pixels in numpy.
"""

from __future__ import annotations

import gzip
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from alexnet.pipeline import artifacts as A
from alexnet.pipeline import constants as C
from alexnet.tools import pca_stats as P
from alexnet.tools.cli import main as prep_main

S = C.STORED_SIZE
CFG = P.PcaStatsConfig(workers=1, progress=False)


# --------------------------------------------------------------------------- datasets through the contract


def jpeg(arr: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def textured(rng: np.random.Generator) -> np.ndarray:
    """Photo-like: a colour gradient, correlated channels, and noise."""
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float64) / S
    base = rng.uniform(40, 200, 3) + rng.uniform(-60, 60, 3) * xx[..., None] + rng.uniform(-60, 60, 3) * yy[..., None]
    luma = rng.normal(0, 25, (S, S, 1))
    return np.clip(base + luma + rng.normal(0, 12, (S, S, 3)), 0, 255).astype(np.uint8)


def write_dataset(root: Path, payloads: list[bytes], shard_sizes: list[int], *, complete=True, splits=("train",)):
    """A dataset of raw JPEG (or garbage) payloads, ``shard_sizes`` records per train shard."""
    assert sum(shard_sizes) == len(payloads)
    infos = {}
    for split in splits:
        shards, pos = [], 0
        for i, size in enumerate(shard_sizes):
            rel = f"{split}/{A.shard_name(split, i, len(shard_sizes))}"
            env = A.open_shard(root / rel, readonly=False, map_size=1 << 28)
            crcs = []
            with env.begin(write=True) as txn:
                for p in range(pos, pos + size):
                    value = A.Datum(data=payloads[p], label=p % 3, height=S, width=S).encode()
                    txn.put(A.make_key(p, f"n0000000{p % 3}/img_{p}.JPEG"), value)
                    crcs.append(A.crc32(value))
            env.close()
            A.write_record_crcs(root / rel, np.array(crcs))
            shards.append(A.ShardInfo(path=rel, num_records=size, first_position=pos, stop_position=pos + size))
            pos += size
        infos[split] = A.SplitInfo(num_records=len(payloads), source_count=len(payloads), shards=shards)
    manifest = A.Manifest(classes=["n00000000", "n00000001", "n00000002"], splits=infos, complete=complete)
    A.write_manifest(root, manifest)
    return root


def decoded(payloads: list[bytes]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(p)).convert("RGB")) for p in payloads])


def reference(images: np.ndarray):
    """Direct numpy over all pixels: mean RGB, population covariance, eigh (descending), mean image."""
    x = images.reshape(-1, 3).astype(np.float64)
    mean = x.mean(0)
    d = x - mean
    cov = d.T @ d / len(x)
    w, v = np.linalg.eigh(cov)
    return mean, cov, w[::-1], v[:, ::-1], images.astype(np.float64).mean(0)


def run_cli(args):
    return CliRunner().invoke(prep_main, ["pca-stats", "--no-progress", *map(str, args)])


@pytest.fixture(scope="module")
def textured_set(tmp_path_factory):
    rng = np.random.default_rng(4)
    payloads = [jpeg(textured(rng)) for _ in range(23)]
    root = write_dataset(tmp_path_factory.mktemp("textured"), payloads, [11, 2, 10])
    return root, payloads, decoded(payloads)


def assert_matches(stats: A.Stats, mean_image: np.ndarray, images: np.ndarray):
    mean, cov, w, v, mean_img = reference(images)
    np.testing.assert_allclose(stats.mean_rgb, mean, rtol=1e-6)
    np.testing.assert_allclose(stats.covariance, cov, rtol=1e-5, atol=1e-5 * np.abs(cov).max())
    np.testing.assert_allclose(stats.eigval, w, rtol=1e-5, atol=1e-5 * w[0])
    ev = stats.eigvec_array
    aligned = v * np.sign(np.sum(v * ev, axis=0))  # sign alignment, column by column
    np.testing.assert_allclose(ev, aligned, atol=1e-5)
    assert mean_image.dtype == np.float32 and mean_image.shape == A.MEAN_IMAGE_SHAPE
    np.testing.assert_allclose(mean_image, mean_img, rtol=1e-6)  # float32 rounding of the exact mean
    assert stats.n_images == len(images) and stats.n_pixels == images.shape[0] * S * S


# --------------------------------------------------------------------------- the accumulator


def test_gram_is_exact_integer_sum():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, S, S, 3), dtype=np.uint8)
    images[0] = 255  # the largest products
    x = images.reshape(-1, 3).astype(np.int64)
    np.testing.assert_array_equal(P._gram_exact(images), x.T @ x)
    odd = rng.integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)  # not a whole number of 256-pixel blocks
    y = odd.reshape(-1, 3).astype(np.int64)
    np.testing.assert_array_equal(P._gram_exact(odd), y.T @ y)


def test_merged_uneven_partials_equal_direct_numpy():
    rng = np.random.default_rng(1)
    images = np.stack([textured(rng) for _ in range(17)])
    images[3] = 255
    images[4] = 0
    parts = []
    for lo, hi in [(0, 1), (1, 8), (8, 9), (9, 17)]:  # uneven chunks, then merged in an uneven tree
        m = P.PixelMoments()
        m.update(images[lo:hi])
        m.update(images[hi:hi])  # an empty chunk changes nothing
        parts.append(m)
    merged = parts[0].merge(parts[2].merge(parts[3])).merge(parts[1])
    whole = P.PixelMoments()
    whole.update(images)
    mean, cov, w, v, mean_img = reference(images)
    for acc in (merged, whole):
        f = acc.finalize()
        np.testing.assert_allclose(f.mean_rgb, mean, rtol=1e-6)
        np.testing.assert_allclose(f.covariance, cov, rtol=1e-5)
        np.testing.assert_allclose(f.eigval, w, rtol=1e-5)
        np.testing.assert_allclose(np.abs(np.sum(f.eigvec * v, axis=0)), 1.0, atol=1e-5)
        np.testing.assert_array_equal(acc.image_sum, images.astype(np.int64).sum(0))
        assert f.n_images == 17 and f.n_pixels == 17 * S * S
    np.testing.assert_array_equal(merged.image_sum, whole.image_sum)


def test_other_image_shapes_match_direct_numpy():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (6, 5, 7, 3), dtype=np.uint8)  # not whole 256-pixel rows
    a, b = P.PixelMoments((5, 7, 3)), P.PixelMoments((5, 7, 3))
    a.update(images[:2])
    b.update(images[2:])
    f = a.merge(b).finalize()
    mean, cov, w, _, mean_img = reference(images)
    np.testing.assert_allclose(f.mean_rgb, mean, rtol=1e-12)
    np.testing.assert_allclose(f.covariance, cov, rtol=1e-9)
    np.testing.assert_allclose(f.mean_image, mean_img, rtol=1e-6)


def test_compiled_kernel_is_built_and_used():
    assert P._kernel is not None, f"the compiled moments kernel is missing: {P.KERNEL_MISSING}"
    assert P.PixelMoments().use_kernel
    assert P.moments_impl().startswith("compiled")


@pytest.mark.parametrize("shape", [(S, S, 3), (5, 7, 3), (1, 1, 3)])
def test_kernel_sums_equal_numpy(shape):
    h, w, _ = shape
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (9, *shape), dtype=np.uint8)
    images[0] = 255
    pix = np.zeros(shape, np.uint16)
    cols = np.zeros((3, w * 3), np.uint32)
    for im in images:
        P._kernel.accumulate(im, w * 3, pix, cols)
    np.testing.assert_array_equal(pix, images.astype(np.int64).sum(0))
    v = images.reshape(-1, w * 3).astype(np.int64)  # rows of interleaved values
    np.testing.assert_array_equal(cols[0], (v * v).sum(0))
    np.testing.assert_array_equal(cols[1, :-1], (v[:, :-1] * v[:, 1:]).sum(0))
    np.testing.assert_array_equal(cols[2, : w * 3 - 2], (v[:, :-2] * v[:, 2:]).sum(0))
    assert cols[1, -1] == 0 and (cols[2, w * 3 - 2 :] == 0).all()


def test_kernel_rejects_mismatched_buffers():
    im = np.zeros((4, 4, 3), np.uint8)
    pix, cols = np.zeros((4, 4, 3), np.uint16), np.zeros((3, 12), np.uint32)
    with pytest.raises(ValueError):
        P._kernel.accumulate(im, 10, pix, cols)  # not whole rows
    with pytest.raises(ValueError):
        P._kernel.accumulate(im, 12, pix[:2], cols)
    with pytest.raises(ValueError):
        P._kernel.accumulate(im, 12, pix, cols[:2])
    with pytest.raises(TypeError):
        P._kernel.accumulate(im, 12, pix.astype(np.int32), cols)
    with pytest.raises((TypeError, ValueError, BufferError)):
        P._kernel.accumulate(im, 12, pix[:, ::2], cols)  # not contiguous


def test_kernel_and_numpy_paths_agree_across_flushes():
    """More white images than a chunk holds (the uint16/uint32 limits), then ordinary ones."""
    rng = np.random.default_rng(5)
    n_white = P.UINT16_SAFE_IMAGES + 44
    fast, slow = P.PixelMoments(use_kernel=True), P.PixelMoments(use_kernel=False)
    white = np.full(A.MEAN_IMAGE_SHAPE, 255, np.uint8)
    for _ in range(n_white):
        fast.add(white)
        slow.add(white)
    tail = np.stack([textured(rng) for _ in range(7)])
    fast.update(tail)
    for im in tail:
        slow.add(im)
    np.testing.assert_array_equal(fast.image_sum, slow.image_sum)
    expected = tail.astype(np.int64).sum(0) + 255 * n_white
    np.testing.assert_array_equal(fast.image_sum, expected)
    ff, fs = fast.finalize(), slow.finalize()
    assert ff.n_images == fs.n_images == n_white + 7
    np.testing.assert_allclose(ff.mean_rgb, fs.mean_rgb, rtol=1e-12)
    np.testing.assert_allclose(ff.covariance, fs.covariance, rtol=1e-9)
    images = np.concatenate([np.broadcast_to(white, (n_white, *white.shape)), tail])
    mean, cov, _, _, _ = reference(images)
    np.testing.assert_allclose(ff.mean_rgb, mean, rtol=1e-6)
    np.testing.assert_allclose(ff.covariance, cov, rtol=1e-5)


def test_pending_images_survive_pickling():
    import pickle

    rng = np.random.default_rng(6)
    images = np.stack([textured(rng) for _ in range(3)])
    m = P.PixelMoments()
    for im in images:
        m.add(im)  # fewer than a chunk: still pending
    back = pickle.loads(pickle.dumps(m))
    np.testing.assert_array_equal(back.image_sum, images.astype(np.int64).sum(0))
    assert back.n_images == 3
    back.add(images[0])  # still usable after the round trip
    assert back.finalize().n_images == 4


def test_update_rejects_wrong_dtype_or_shape():
    m = P.PixelMoments()
    with pytest.raises(ValueError):
        m.update(np.zeros((1, S, S, 3), np.float32))
    with pytest.raises(ValueError):
        m.update(np.zeros((1, 8, 8, 3), np.uint8))


def test_sign_convention_reproduces_the_widely_used_imagenet_orientation():
    ref = np.asarray(C.IMAGENET_REFERENCE_EIGVEC)
    for signs in ([1, 1, 1], [-1, 1, -1], [-1, -1, -1], [1, -1, 1]):
        np.testing.assert_array_equal(P.orient_eigvec(ref * np.array(signs)), ref)
    assert (P.orient_eigvec(ref)[:, 0] < 0).all()  # the first eigenvector: all negative


# --------------------------------------------------------------------------- known statistics


def test_constant_colour_gives_zero_covariance(tmp_path):
    payloads = [jpeg(np.full((S, S, 3), (200, 30, 90), np.uint8)) for _ in range(4)]
    stats, mean_image = P.compute_stats(write_dataset(tmp_path, payloads, [3, 1]), CFG)
    colour = decoded(payloads)[0, 0, 0].astype(np.float64)  # what JPEG made of the colour
    assert (decoded(payloads) == colour).all()
    np.testing.assert_allclose(stats.mean_rgb, colour, rtol=1e-12)
    assert np.array_equal(stats.covariance, np.zeros((3, 3))) and np.array_equal(stats.eigval, [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(mean_image, np.broadcast_to(colour, A.MEAN_IMAGE_SHAPE).astype(np.float32))


def test_two_colours_give_rank_one_covariance_along_their_difference(tmp_path):
    a, b = (220, 40, 30), (20, 90, 200)
    payloads = [jpeg(np.full((S, S, 3), c, np.uint8)) for c in [a, a, a, b]]
    stats, mean_image = P.compute_stats(write_dataset(tmp_path, payloads, [1, 3]), CFG)
    imgs = decoded(payloads)
    ca, cb = imgs[0, 0, 0].astype(np.float64), imgs[3, 0, 0].astype(np.float64)
    diff = ca - cb
    p = 0.75
    np.testing.assert_allclose(stats.covariance, p * (1 - p) * np.outer(diff, diff), rtol=1e-9)
    np.testing.assert_allclose(stats.eigval[0], p * (1 - p) * diff @ diff, rtol=1e-9)
    assert abs(stats.eigval[1]) < 1e-9 * stats.eigval[0] and abs(stats.eigval[2]) < 1e-9 * stats.eigval[0]
    np.testing.assert_allclose(np.abs(stats.eigvec_array[:, 0] @ diff) / np.linalg.norm(diff), 1.0, atol=1e-9)
    np.testing.assert_allclose(mean_image, np.broadcast_to(p * ca + (1 - p) * cb, A.MEAN_IMAGE_SHAPE), rtol=1e-6)


def test_whole_set_matches_direct_numpy_serial_and_parallel(textured_set):
    root, _, images = textured_set
    serial = P.compute_stats(root, CFG)
    parallel = P.compute_stats(root, P.PcaStatsConfig(workers=2, progress=False))
    for stats, mean_image in (serial, parallel):
        assert_matches(stats, mean_image, images)
        assert stats.source["skipped"] == 0 and stats.source["sample"] is None
        assert stats.source["shards"] == [s.path for s in A.read_manifest(root).splits["train"].shards]
    np.testing.assert_array_equal(serial[1], parallel[1])  # the mean image is exact: bit-identical
    np.testing.assert_allclose(serial[0].covariance, parallel[0].covariance, rtol=1e-12)


def test_files_round_trip_through_the_contract(textured_set, tmp_path):
    src, payloads, images = textured_set
    root = tmp_path / "d"
    shutil.copytree(src, root)
    r = run_cli(["--data-dir", root, "--workers", "2"])
    assert r.exit_code == 0, r.output
    stats, mean_image = A.read_stats(root), A.read_mean_image(root)
    assert_matches(stats, mean_image, images)
    direct, direct_image = P.compute_stats(root, CFG)
    assert stats.mean_rgb == pytest.approx(direct.mean_rgb, rel=1e-12)
    np.testing.assert_array_equal(mean_image, direct_image)
    assert "for orientation" in r.output and "mean RGB" in r.output and "eigenvectors" in r.output
    assert "123.68" in r.output  # the ImageNet reference figures, beside ours
    assert f"{stats.mean_rgb[0]:.3f}" in r.output
    assert not list(root.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_sample_is_seeded_reproducible_and_recorded(textured_set):
    root, _, images = textured_set
    cfg = P.PcaStatsConfig(sample=7, seed=3, workers=1, progress=False)
    a, ia = P.compute_stats(root, cfg)
    b, ib = P.compute_stats(root, P.PcaStatsConfig(sample=7, seed=3, workers=2, progress=False))
    c, _ = P.compute_stats(root, P.PcaStatsConfig(sample=7, seed=4, workers=1, progress=False))
    assert a.n_images == 7 and a.source["sample"] == 7 and a.source["seed"] == 3
    assert a.source["split_records"] == 23 and a.source["records_used"] == 7
    np.testing.assert_array_equal(ia, ib)
    assert a.mean_rgb == pytest.approx(b.mean_rgb, rel=1e-12)
    assert c.mean_rgb != pytest.approx(a.mean_rgb, rel=1e-9)
    # the sample is a subset: its mean image is the mean of 7 of the decoded records
    picked = np.sort(np.random.default_rng(3).choice(23, size=7, replace=False))
    np.testing.assert_allclose(ia, images[picked].astype(np.float64).mean(0), rtol=1e-6)
    full, _ = P.compute_stats(root, P.PcaStatsConfig(sample=100, workers=1, progress=False))  # more than there are
    assert full.n_images == 23 and full.source["sample"] is None


# --------------------------------------------------------------------------- bad input


def test_half_built_dataset_refused_with_one_line(tmp_path):
    write_dataset(tmp_path, [jpeg(np.zeros((S, S, 3), np.uint8))] * 2, [2], complete=False)
    r = run_cli(["--data-dir", tmp_path])
    assert r.exit_code == 1
    assert r.output.strip().count("\n") == 0 and "half-built" in r.output and "Traceback" not in r.output
    assert not (tmp_path / A.STATS_FILE).exists()


def test_missing_shard_no_train_split_no_dataset(tmp_path):
    payloads = [jpeg(np.zeros((S, S, 3), np.uint8))] * 3
    root = write_dataset(tmp_path / "a", payloads, [2, 1])
    shutil.rmtree(root / "train" / A.shard_name("train", 1, 2))
    r = run_cli(["--data-dir", root])
    assert r.exit_code == 1 and "shard(s) missing" in r.output and "train-00001-of-00002" in r.output
    val_only = write_dataset(tmp_path / "b", payloads, [3], splits=("val",))
    r = run_cli(["--data-dir", val_only])
    assert r.exit_code == 1 and "no train split" in r.output
    r = run_cli(["--data-dir", tmp_path / "nothing"])
    assert r.exit_code == 1 and "manifest.json is missing" in r.output


def test_corrupt_record_reported_or_fails(tmp_path):
    rng = np.random.default_rng(5)
    good = [jpeg(textured(rng)) for _ in range(9)]
    payloads = good[:4] + [b"\xff\xd8 this is not a JPEG"] + good[4:]
    root = write_dataset(tmp_path, payloads, [6, 4])
    r = run_cli(["--data-dir", root])  # default --max-skipped 0.001: 1 of 10 is too many
    assert r.exit_code == 1 and "1 of 10 records did not decode" in r.output and "nothing written" in r.output
    assert "00000004_" in r.output
    assert not (root / A.STATS_FILE).exists() and not (root / A.MEAN_IMAGE_FILE).exists()
    r = run_cli(["--data-dir", root, "--max-skipped", "0.2", "--workers", "2"])
    assert r.exit_code == 0, r.output
    assert "skipped records: 1" in r.output and "00000004_n00000001/img_4.JPEG" in r.output
    stats, mean_image = A.read_stats(root), A.read_mean_image(root)
    assert stats.source["skipped"] == 1 and "00000004_" in stats.source["skipped_records"][0]
    assert_matches(stats, mean_image, decoded(good))  # the good records, exactly


def test_cli_help_and_bad_options():
    r = CliRunner().invoke(prep_main, ["pca-stats", "--help"])
    assert r.exit_code == 0 and "--sample" in r.output and "Examples" in r.output
    r = CliRunner().invoke(prep_main, ["pca-stats", "--workers", "-1"])
    assert r.exit_code == 2


def test_one_decoder_for_stored_records():
    """images.decode_record: PIL's pixels of a 256x256 JPEG; grayscale made RGB unless rgb_only; anything
    else a Rejected saying what it is (pca-stats skips it, verify reports it)."""
    from PIL import Image

    from alexnet.pipeline.images import Rejected, decode_record

    def encoded(arr, fmt="JPEG"):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format=fmt)
        return buf.getvalue()

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (S, S, 3), dtype=np.uint8)
    jpeg = encoded(rgb)
    np.testing.assert_array_equal(decode_record(jpeg), np.asarray(Image.open(io.BytesIO(jpeg))))
    grey = encoded(rgb[..., 0])
    assert decode_record(grey).shape == (S, S, 3)
    with pytest.raises(Rejected, match="image is JPEG L 256x256, expected RGB JPEG 256x256"):
        decode_record(grey, rgb_only=True)
    with pytest.raises(Rejected, match="image is PNG RGB 256x256, expected JPEG 256x256"):
        decode_record(encoded(rgb, "PNG"))
    with pytest.raises(Rejected, match="image is JPEG RGB 300x256"):
        decode_record(encoded(np.zeros((S, 300, 3), np.uint8)))
    with pytest.raises(Rejected, match=r"^JPEG does not decode \("):
        decode_record(b"\xff\xd8 this is not a JPEG")
    # a gzip-wrapped source is unwrapped by the builder (decode_source), never in a stored record: DALI
    # could not decode it
    with pytest.raises(Rejected, match=r"^JPEG does not decode \("):
        decode_record(gzip.compress(jpeg))
