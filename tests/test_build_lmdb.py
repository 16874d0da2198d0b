"""build-lmdb: geometry (numpy references), awkward files, contract order, resume after kill -9, DALI reads it."""

import io
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from _build_lmdb_fixtures import (
    BUILD_ARGS,
    all_records,
    clean_build,
    committed_records,
    run_prep,
    sample_info,
    sample_tree,
)
from PIL import Image

from alexnet.pipeline import artifacts as A
from alexnet.pipeline import constants as C
from alexnet.pipeline import images as IMG
from alexnet.pipeline import locks as L
from alexnet.pipeline.errors import ContractError
from alexnet.tools import build_lmdb as B


@pytest.fixture(scope="session")
def src(tmp_path_factory):
    return sample_tree(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    return clean_build(tmp_path_factory.getbasetemp())


def _jpeg(arr, quality=95, **kw):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality, **kw)
    return buf.getvalue()


def _decode(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).astype(np.float64)


def _photo(w, h, seed=0):
    """Photo-like content with fine detail (noise blurred over ~1 px), the hard case for DCT scaling."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([128 + 60 * np.sin(xx / (37 + 7 * c)) * np.cos(yy / (53 + 5 * c)) for c in range(3)], -1)
    img += gaussian_filter(rng.normal(0, 40, (h, w, 3)), (1, 1, 0)) + rng.normal(0, 6, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize(
    "size, resized",
    [
        ((500, 375), (341, 256)),
        ((375, 500), (256, 341)),
        ((256, 256), (256, 256)),
        ((31, 23), (345, 256)),
        ((4000, 3000), (341, 256)),
        ((1000, 256), (1000, 256)),
    ],
)
def test_centre_crop_box(size, resized):
    got, box = IMG.centre_crop_box(*size)
    assert got == resized and min(got) == C.RESIZE_SHORTER
    left, top = (resized[0] - C.STORED_SIZE) // 2, (resized[1] - C.STORED_SIZE) // 2
    sx, sy = size[0] / resized[0], size[1] / resized[1]
    assert box == pytest.approx((left * sx, top * sy, (left + 256) * sx, (top + 256) * sy))
    # The box is centred in the source (to within half a resized pixel).
    assert abs((box[0] + box[2]) / 2 - size[0] / 2) <= sx / 2 + 1e-9
    assert abs((box[1] + box[3]) / 2 - size[1] / 2) <= sy / 2 + 1e-9


@pytest.mark.parametrize("w, h", [(600, 300), (300, 600), (140, 100)])
def test_centre_crop_geometry_on_a_ramp(w, h):
    """A linear ramp survives (antialiased) bilinear resampling exactly: each stored pixel must hold the
    source coordinate it maps to. Numpy reference: x_src = (left + i + 0.5) * w / new_w - 0.5."""
    xs = np.linspace(0, 255, w)
    ys = np.linspace(0, 255, h)
    src = np.zeros((h, w, 3), np.float32)
    src[..., 0] = xs[None, :]
    src[..., 1] = ys[:, None]
    im = Image.fromarray(np.round(src).astype(np.uint8))
    out = np.asarray(IMG.resize_centre_crop(im)).astype(np.float64)
    assert out.shape == (C.STORED_SIZE, C.STORED_SIZE, 3)
    (new_w, new_h), _ = IMG.centre_crop_box(w, h)
    left, top = (new_w - 256) // 2, (new_h - 256) // 2
    x_src = (left + np.arange(256) + 0.5) * w / new_w - 0.5
    y_src = (top + np.arange(256) + 0.5) * h / new_h - 0.5
    want_r = np.interp(x_src, np.arange(w), xs)
    want_g = np.interp(y_src, np.arange(h), ys)
    inner = slice(8, -8)  # away from the image border, where the filter support is clipped
    assert np.abs(out[inner, inner, 0] - want_r[None, inner]).max() <= 1.0
    assert np.abs(out[inner, inner, 1] - want_g[inner, None]).max() <= 1.0


@pytest.mark.parametrize("w, h", [(500, 375), (333, 500), (31, 23), (777, 256)])
def test_box_resize_equals_resize_then_crop(w, h):
    """Computing only the central window is the same as the straightforward resize-all-then-crop."""
    im = Image.fromarray(_photo(w, h, seed=w))
    (new_w, new_h), _ = IMG.centre_crop_box(w, h)
    full = np.asarray(im.resize((new_w, new_h), Image.Resampling.BILINEAR)).astype(int)
    left, top = (new_w - 256) // 2, (new_h - 256) // 2
    ref = full[top : top + 256, left : left + 256]
    got = np.asarray(IMG.resize_centre_crop(im)).astype(int)
    assert np.abs(got - ref).max() <= 1


def test_draft_within_tolerance():
    """DCT-scaled decoding of big JPEGs stays within DRAFT_TOLERANCE of the full decode (mean abs, grey levels)."""
    for w, h in [(2048, 1536), (1100, 1600)]:
        data = _jpeg(_photo(w, h, seed=h), quality=90)
        drafted = IMG.decode_image(data, draft=True)
        assert min(drafted.size) >= IMG.DRAFT_MIN_FACTOR * C.RESIZE_SHORTER
        assert drafted.size[0] < w  # the decoder really did scale
        a = np.asarray(IMG.resize_centre_crop(drafted)).astype(float)
        b = np.asarray(IMG.resize_centre_crop(IMG.decode_image(data, draft=False))).astype(float)
        assert np.abs(a - b).mean() < IMG.DRAFT_TOLERANCE
    # No draft when it would go below DRAFT_MIN_FACTOR x 256 (typical 500x375 images).
    assert IMG.decode_image(_jpeg(_photo(1000, 700)), draft=True).size == (1000, 700)


# --------------------------------------------------------------------------- awkward files


def test_awkward_files_kept_or_rejected(src, built):
    info = sample_info(src)
    m = A.read_manifest(built)
    train_root = src / info["train_dir"]
    stored = {A.parse_key(k)[1]: A.Datum.decode(v) for k, v in all_records(built)["train"]}
    rejected = {r["path"]: r["reason"] for r in m.rejected}
    for kind, rel_root in info["awkward"].items():
        rel = os.path.relpath(src / rel_root, train_root)
        raw = (src / rel_root).read_bytes()
        if kind in ("truncated", "zero_byte"):
            assert rel in rejected and rel not in stored
            assert rejected[rel].startswith("zero-byte" if kind == "zero_byte" else "truncated")
            continue
        d = stored[rel]
        assert d.label == info["classes"].index(rel.split("/")[0])
        out = _decode(d.data)
        assert out.shape == (256, 256, 3)
        # Reference: PIL's own RGB conversion, whole-image resize, numpy centre crop.
        im = Image.open(io.BytesIO(raw))
        im.load()
        ref_im = im.convert("RGB")
        (nw, nh), _ = IMG.centre_crop_box(*ref_im.size)
        full = np.asarray(ref_im.resize((nw, nh), Image.Resampling.BILINEAR)).astype(float)
        left, top = (nw - 256) // 2, (nh - 256) // 2
        ref = full[top : top + 256, left : left + 256]
        # Same pixels through the same JPEG q95 encoder: only rounding (and, for very_large, draft) differences.
        ref_q95 = _decode(_jpeg(ref.astype(np.uint8), quality=95))
        assert np.abs(out - ref_q95).mean() < 0.6, kind
        assert np.abs(out.mean(axis=(0, 1)) - ref.mean(axis=(0, 1))).max() < 1.0, kind
        if kind == "grayscale":
            assert im.mode == "L" and np.abs(out[..., 0] - out[..., 2]).max() <= 2
        if kind == "cmyk":
            assert im.mode == "CMYK"
        if kind == "png_named_jpeg":
            assert im.format == "PNG"
        if kind == "tiny":
            assert im.size == (31, 23)  # upscaled to 256
        if kind == "exif_rotated":
            # Orientation is ignored (stored as coded, like the reference ImageNet loaders).
            from PIL import ImageOps

            assert im.getexif().get(0x0112) == 6
            rotated = ImageOps.exif_transpose(im).convert("RGB")
            assert rotated.size == im.size[::-1]
    assert len(m.rejected) == 2 and m.splits["train"].rejected == 2
    tsv = (built / A.REJECTED_FILE).read_text().splitlines()
    assert tsv[0] == "split\tpath\treason" and len(tsv) == 3


def test_undecodable_and_not_an_image():
    with pytest.raises(IMG.Rejected, match="zero-byte"):
        B.prepare_image(b"")
    with pytest.raises(IMG.Rejected, match="not an image"):
        B.prepare_image(b"this is a text file, not a JPEG" * 10)
    good = _jpeg(_photo(300, 200))
    broken = good[:200] + bytes(len(good) - 200)  # header intact, entropy data zeroed
    with pytest.raises(IMG.Rejected):
        B.prepare_image(broken[: len(good) // 2])
    out = _decode(B.prepare_image(good, quality=95))
    assert out.shape == (256, 256, 3)


# --------------------------------------------------------------------------- the contract


def test_records_follow_the_contract(src, built):
    """Positions = seeded shuffle of the sorted file list; shard blocks from shard_bounds; labels = sorted index."""
    from alexnet.tools.sources import detect_source

    m = A.read_manifest(built)
    source = detect_source(src)
    assert m.classes == source.classes and m.complete
    records = all_records(built)
    rejected = {(r["split"], r["path"]) for r in m.rejected}
    for name, split in source.splits.items():
        info = m.splits[name]
        n = len(split)
        order = A.shuffle_order(n, 3)  # --seed 3
        expect = [
            A.make_key(p, split.relpaths[int(order[p])])
            for p in range(n)
            if (name, split.relpaths[int(order[p])]) not in rejected
        ]
        keys = [k for k, _ in records[name]]
        assert keys == expect == sorted(keys)
        labels = split.labels(source.classes)
        for k, v in records[name]:
            pos, rel = A.parse_key(k)
            assert A.Datum.decode(v).label == labels[split.relpaths.index(rel)]
        # Shard i holds exactly the positions of shard_bounds(n, S)[i].
        bounds = A.shard_bounds(n, len(info.shards))
        for sh, (start, stop) in zip(info.shards, bounds, strict=True):
            assert (sh.first_position, sh.stop_position) == (start, stop)
            pos = [A.parse_key(k)[0] for k, _ in A.iter_shard(built / sh.path)]
            assert all(start <= p < stop for p in pos) and len(pos) == sh.num_records
            assert A.read_record_crcs(built / sh.path).tolist() == [
                A.crc32(v) for _, v in A.iter_shard(built / sh.path)
            ]
        assert info.num_records + info.rejected == info.source_count == n
    assert m.build["jpeg_quality"] == 95 and m.build["resample"] == "bilinear"
    assert m.build["exif_orientation"] == "ignored" and m.build["num_shards"] == {"train": 3, "val": 2}


def test_dali_caffe_reader_reads_every_shard(built):
    """DALI's native reader (CPU-only mode) reads the list of shards; every record decodes to 256x256x3."""
    from nvidia.dali import fn, pipeline_def, types

    m = A.read_manifest(built)
    for split in m.splits:
        records = all_records(built)[split]
        n = len(records)
        paths = [str(p) for p in m.shard_paths(built, split)]

        @pipeline_def(batch_size=n, num_threads=1, device_id=None)
        def pipe(paths=paths):
            jpegs, labels = fn.readers.caffe(path=paths, random_shuffle=False, name="Reader")
            return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB), labels

        p = pipe()
        p.build()
        assert p.epoch_size("Reader") == n
        images, labels = p.run()
        for i, (_, value) in enumerate(records):
            d = A.Datum.decode(value)
            assert int(np.array(labels.at(i)).reshape(-1)[0]) == d.label
            img = np.array(images.at(i))
            assert img.shape == (256, 256, 3)
            assert np.abs(img.astype(float) - _decode(d.data)).mean() < 1.0  # same JPEG, DALI's decoder


# --------------------------------------------------------------------------- resume, no-op, overwrite


def _mtimes(data):
    """The dataset's files; the lock file is rewritten by every command that takes the lock."""
    return {p: p.stat().st_mtime_ns for p in data.rglob("*") if p.is_file() and p.name != L.LOCK_FILE}


def test_rerun_is_a_noop(src, built, tmp_path):
    data = tmp_path / "d"
    shutil.copytree(built, data)
    mtimes = _mtimes(data)
    r = run_prep(["build-lmdb", str(src), "--data-dir", str(data), *BUILD_ARGS])
    assert r.exit_code == 0, r.output
    assert "nothing to do" in r.output
    assert _mtimes(data) == mtimes
    # A finished dataset stays valid after a PIL upgrade (a half-built one does not: see below).
    m = A.read_manifest(data)
    m.build["pil"] = "pillow-simd 0.0.post0 (older)"
    A.write_manifest(data, m)
    r = run_prep(["build-lmdb", str(src), "--data-dir", str(data), *BUILD_ARGS])
    assert r.exit_code == 0 and "nothing to do" in r.output and "was built with pillow-simd 0.0" in r.output
    # Other output options: refused with a clear line; --overwrite rebuilds.
    r = run_prep(["build-lmdb", str(src), "--data-dir", str(data), *BUILD_ARGS, "--jpeg-quality", "80"])
    assert r.exit_code == 1 and "refusing to reuse" in r.output and "jpeg_quality: 95 -> 80" in r.output
    r = run_prep(["build-lmdb", str(src), "--data-dir", str(data), *BUILD_ARGS, "--jpeg-quality", "80", "--overwrite"])
    assert r.exit_code == 0, r.output
    assert A.read_manifest(data).build["jpeg_quality"] == 80
    for split, recs in all_records(data).items():
        assert [k for k, _ in recs] == [k for k, _ in all_records(built)[split]]
    assert "images/s" in r.output and "rejected 2 source files" in r.output


# A build slow enough to be stopped part-way from outside: the sample plus large PNGs (no draft
# decoding for them, ~80 ms each), hard links of one file. Interrupted builds run with
# --commit-every 2, so records are committed from the first images on.
SLOW_IMAGES = 32
BUILD_CMD = [sys.executable, "-m", "alexnet.tools.cli", "build-lmdb"]
INTERRUPTED_ARGS = ["--workers", "2", "--commit-every", "2", *BUILD_ARGS]


@pytest.fixture(scope="session")
def slow_src(src, tmp_path_factory):
    from alexnet.tools.sample import draw_image

    root = tmp_path_factory.getbasetemp() / "build_lmdb_slow"
    shutil.copytree(src, root)
    big = root / "big.png"
    Image.fromarray(draw_image(0, 4, np.random.default_rng(0), size=(2400, 1800))).save(big, compress_level=1)
    wnids = sample_info(root)["classes"]
    for k in range(SLOW_IMAGES):
        os.link(big, root / "train" / wnids[k % len(wnids)] / f"slow_{k}.png")
    big.unlink()
    return root


@pytest.fixture(scope="session")
def slow_built(slow_src, tmp_path_factory):
    data = tmp_path_factory.getbasetemp() / "build_lmdb_slow_clean"
    r = run_prep(["build-lmdb", str(slow_src), "--data-dir", str(data), "--workers", "2", *BUILD_ARGS])
    assert r.exit_code == 0, r.output
    return data


def _build(src, data):
    """The interrupted builds' command, run to its end."""
    cmd = [*BUILD_CMD, str(src), "--data-dir", str(data), *INTERRUPTED_ARGS]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _start_build(src, data, at_least: int):
    """Start the build in its own session and return it once ``at_least`` records are committed, still running."""
    import time

    proc = subprocess.Popen(
        [*BUILD_CMD, str(src), "--data-dir", str(data), *INTERRUPTED_ARGS],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and committed_records(data) < at_least:
        time.sleep(0.01)
    if proc.poll() is not None or time.monotonic() >= deadline:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"the build was not stopped part-way: {proc.communicate()}")
    return proc


def _kill_build(src, data, at_least: int) -> None:
    """kill -9 of the whole build (main process and workers at once) after ``at_least`` committed records."""
    proc = _start_build(src, data, at_least)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("at_least", [2, 10])
def test_killed_build_resumes_to_the_same_records(slow_src, slow_built, tmp_path, at_least):
    """kill -9 of the whole build part-way, then the same command: equal to a clean build, record for record."""
    data = tmp_path / "d"
    _kill_build(slow_src, data, at_least)
    m = A.read_manifest(data, require_complete=False)
    assert not m.complete
    partial = sum(len(v) for v in all_records(data).values())
    clean = all_records(slow_built)
    assert at_least <= partial < sum(len(v) for v in clean.values())
    with pytest.raises(ContractError, match="half-built"):
        A.read_manifest(data)
    r = _build(slow_src, data)
    assert r.returncode == 0, r.stderr
    assert "after resuming" in r.stdout
    assert all_records(data) == clean  # every key and value, in order: no duplicate, none lost
    m, mc = A.read_manifest(data), A.read_manifest(slow_built)
    assert m.splits == mc.splits and m.rejected == mc.rejected
    assert (data / A.REJECTED_FILE).read_text() == (slow_built / A.REJECTED_FILE).read_text()
    for split in m.splits:
        for a, b in zip(m.shard_paths(data, split), mc.shard_paths(slow_built, split), strict=True):
            assert np.array_equal(A.read_record_crcs(a), A.read_record_crcs(b))


def test_resume_with_other_options_refused(slow_src, tmp_path):
    data = tmp_path / "d"
    _kill_build(slow_src, data, 2)
    r = run_prep(["build-lmdb", str(slow_src), "--data-dir", str(data), *BUILD_ARGS, "--seed", "4"])
    assert r.exit_code == 1 and "refusing to resume" in r.output and "seed: 3 -> 4" in r.output
    m = A.read_manifest(data, require_complete=False)
    m.build["pil"] = "pillow-simd 0.0.post0 (older)"
    A.write_manifest(data, m)
    r = run_prep(["build-lmdb", str(slow_src), "--data-dir", str(data), *BUILD_ARGS])
    assert r.exit_code == 1 and "refusing to resume" in r.output and "pil:" in r.output


def test_map_full_grows_instead_of_failing(src, built, tmp_path):
    """A tiny initial LMDB map: the builder grows it (env.set_mapsize) and the result is unchanged."""
    data = tmp_path / "d"
    cfg = B.BuildConfig(
        source=src,
        data_dir=data,
        workers=2,
        train_shards=3,
        val_shards=2,
        seed=3,
        initial_map_size=64 << 10,
        progress=False,
    )
    B.build_lmdb(cfg)
    assert all_records(data) == all_records(built)


def test_default_shard_count():
    assert B.default_num_shards(1) == 1
    assert B.default_num_shards(600) == 2
    assert B.default_num_shards(3000) == 11
    assert B.default_num_shards(C.IMAGENET_VAL_IMAGES) == 16
    assert B.default_num_shards(C.IMAGENET_TRAIN_IMAGES) == 129


def _tree_of_session(sid):
    """Pids of the processes in session ``sid`` (the build was started in its own session)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def _gone(pid, timeout=10.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # a zombie of an exited worker is gone for our purposes
            if open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux-only")
def test_sigterm_stops_cleanly_and_kill9_of_the_parent_takes_the_workers(slow_src, slow_built, tmp_path):
    data = tmp_path / "d"
    # SIGTERM (a scheduler's stop): exit 130 with the resume hint, workers terminated.
    proc = _start_build(slow_src, data, 2)
    workers = [pid for pid in _tree_of_session(proc.pid) if pid != proc.pid]
    assert len(workers) == 2
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "run the same command again to resume" in err and "Traceback" not in err
    assert all(_gone(w) for w in workers)
    # kill -9 of the main process alone: the workers die with it (no orphan keeps writing a shard).
    proc = _start_build(slow_src, data, committed_records(data) + 2)
    workers = [pid for pid in _tree_of_session(proc.pid) if pid != proc.pid]
    proc.kill()
    proc.wait(timeout=60)  # not communicate(): an orphaned worker would hold the pipes open
    orphaned = not all(_gone(w) for w in workers)
    if orphaned:  # clean up before failing
        for pid in _tree_of_session(proc.pid):
            os.kill(pid, signal.SIGKILL)
    proc.stdout.close()
    proc.stderr.close()
    assert not orphaned, "worker outlived its parent"
    r = _build(slow_src, data)
    assert r.returncode == 0, r.stderr
    assert all_records(data) == all_records(slow_built)
