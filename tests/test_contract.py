"""The data contract: records, keys, manifest and stats round-trip; DALI reads what we write."""

import contextlib
import io
import json
import subprocess

import numpy as np
import pytest
from _writers import write_split
from PIL import Image

from alexnet.pipeline import artifacts as A
from alexnet.pipeline.errors import ContractError


def _jpeg(arr: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def test_datum_round_trip_and_wire_format():
    d = A.Datum(data=b"\xff\xd8abc" * 100, label=999, height=256, width=256)
    enc = d.encode()
    # Field 7 (encoded) is written explicitly even though true: tag 0x38, value 1.
    assert enc.endswith(b"\x38\x01")
    assert enc.startswith(b"\x08\x03\x10\x80\x02\x18\x80\x02")  # channels=3, height=256, width=256 as varints
    assert A.Datum.decode(enc) == d


def test_datum_decodes_protobuf_field_order_independently():
    d = A.Datum(data=b"xyz", label=5, height=2, width=3)
    # Re-order fields as another writer might: label first, then data, then the rest.
    parts = [b"\x28\x05", b"\x22\x03xyz", b"\x08\x03", b"\x10\x02", b"\x18\x03", b"\x38\x01"]
    assert A.Datum.decode(b"".join(parts)) == d


def test_datum_rejects_truncated():
    enc = A.Datum(data=b"x" * 50, label=1, height=1, width=1).encode()
    with pytest.raises(ContractError):
        A.Datum.decode(enc[:20])


def test_keys():
    key = A.make_key(42, "n01440764/n01440764_10026.JPEG")
    assert key == b"00000042_n01440764/n01440764_10026.JPEG"
    assert A.parse_key(key) == (42, "n01440764/n01440764_10026.JPEG")
    # Keys sort by position: lexicographic order of the zero-padded prefix.
    keys = [A.make_key(p, "a") for p in (10, 2, 100, 1)]
    assert sorted(keys) == [A.make_key(p, "a") for p in (1, 2, 10, 100)]
    with pytest.raises(ContractError):
        A.parse_key(b"12_x")


def test_shard_bounds_and_shuffle():
    bounds = A.shard_bounds(10, 3)
    assert bounds == [(0, 3), (3, 6), (6, 10)]
    assert A.shard_bounds(2, 4)[0] == (0, 0)  # more shards than items: empty blocks, still contiguous
    order = A.shuffle_order(1000, seed=7)
    assert sorted(order.tolist()) == list(range(1000))
    assert np.array_equal(order, A.shuffle_order(1000, seed=7))
    assert not np.array_equal(order, A.shuffle_order(1000, seed=8))
    assert A.shard_name("train", 3, 16) == "train-00003-of-00016"


def _manifest():
    return A.Manifest(
        classes=["n01440764", "n01443537"],
        splits={
            "train": A.SplitInfo(
                num_records=3,
                source_count=4,
                rejected=1,
                layout="class-folders",
                shards=[
                    A.ShardInfo(path="train/train-00000-of-00001", num_records=3, first_position=0, stop_position=4)
                ],
            )
        },
        build={"resize_shorter": 256, "jpeg_quality": 95},
        rejected=[{"split": "train", "path": "x.JPEG", "reason": "zero-byte file"}],
    )


def test_manifest_round_trip(tmp_path):
    m = _manifest()
    A.write_manifest(tmp_path, m)
    assert A.read_manifest(tmp_path) == m
    assert json.loads((tmp_path / A.MANIFEST_FILE).read_text())["schema_version"] == A.SCHEMA_VERSION
    assert A.read_manifest(tmp_path).shard_paths(tmp_path, "train") == [tmp_path / "train/train-00000-of-00001"]


def test_manifest_schema_version_checked(tmp_path):
    A.write_manifest(tmp_path, _manifest())
    d = json.loads((tmp_path / A.MANIFEST_FILE).read_text())
    d["schema_version"] = 99
    (tmp_path / A.MANIFEST_FILE).write_text(json.dumps(d))
    with pytest.raises(ContractError, match="schema version 99"):
        A.read_manifest(tmp_path)


def test_half_built_manifest_refused(tmp_path):
    m = _manifest()
    m.complete = False
    A.write_manifest(tmp_path, m)
    with pytest.raises(ContractError, match="half-built"):
        A.read_manifest(tmp_path)
    assert A.read_manifest(tmp_path, require_complete=False).complete is False


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(ContractError, match="no dataset"):
        A.read_manifest(tmp_path / "nope")


def test_stats_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    mean_image = rng.uniform(0, 255, A.MEAN_IMAGE_SHAPE).astype(np.float32)
    s = A.Stats(
        mean_rgb=[120.0, 110.0, 100.0],
        eigval=[3.0, 2.0, 1.0],
        eigvec=np.eye(3).tolist(),
        n_images=10,
        n_pixels=10 * 256 * 256,
        covariance=np.diag([3.0, 2.0, 1.0]).tolist(),
        source={"split": "train"},
    )
    A.write_stats(tmp_path, s, mean_image)
    assert A.read_stats(tmp_path) == s
    back = A.read_mean_image(tmp_path)
    assert back.dtype == np.float32 and np.array_equal(back, mean_image)
    with pytest.raises(ContractError):
        A.write_stats(tmp_path, s, mean_image[:10])


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "f.json"
    A.atomic_write_json(path, {"a": 1})

    class Boom:
        pass

    with pytest.raises(TypeError):
        A.atomic_write_json(path, {"a": Boom()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # no temporary left behind


def _write_shards(tmp_path, images, labels, num_shards=2):
    """Write records through the contract as a builder does (positions in the seeded shuffled order)."""
    records = [
        (f"c{lab}/img{src}.JPEG", _jpeg(img), lab) for src, (img, lab) in enumerate(zip(images, labels, strict=True))
    ]
    split = write_split(tmp_path, "train", records, num_shards, seed=0)
    A.write_manifest(tmp_path, A.Manifest(classes=["a", "b", "c"], splits={"train": split}))
    return A.shuffle_order(len(images), seed=0)


def test_records_round_trip_through_lmdb(tmp_path):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(7)]
    labels = [i % 3 for i in range(7)]
    order = _write_shards(tmp_path, images, labels)
    records = list(A.iter_records(tmp_path, "train"))
    assert [A.parse_key(k)[0] for k, _ in records] == list(range(7))  # key order over shards in manifest order
    assert [d.label for _, d in records] == [labels[int(order[p])] for p in range(7)]
    m = A.read_manifest(tmp_path)
    for shard in m.shard_paths(tmp_path, "train"):
        values = [v for _, v in A.iter_shard(shard)]
        assert A.read_record_crcs(shard).tolist() == [A.crc32(v) for v in values]


def test_dali_caffe_reader_reads_contract_records(tmp_path):
    """DALI's native fn.readers.caffe reads a list of shards written through the contract, CPU-only mode."""
    from nvidia.dali import fn, pipeline_def, types

    rng = np.random.default_rng(2)
    colours = rng.integers(0, 256, (9, 3))
    images = [np.broadcast_to(c.astype(np.uint8), (256, 256, 3)).copy() for c in colours]
    labels = [i % 3 for i in range(9)]
    order = _write_shards(tmp_path, images, labels, num_shards=3)
    paths = [str(p) for p in A.read_manifest(tmp_path).shard_paths(tmp_path, "train")]

    @pipeline_def(batch_size=9, num_threads=1, device_id=None)
    def pipe():
        jpegs, lab = fn.readers.caffe(path=paths, random_shuffle=False, name="Reader")
        return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB), lab

    p = pipe()
    p.build()
    imgs, labs = p.run()
    got_labels = [int(np.array(labs.at(i)).reshape(-1)[0]) for i in range(9)]
    assert got_labels == [labels[int(order[pos])] for pos in range(9)]
    for pos in range(9):
        img = np.array(imgs.at(pos))
        assert img.shape == (256, 256, 3)
        # Constant-colour JPEGs decode to (nearly) their colour.
        assert np.abs(img.astype(int).mean(axis=(0, 1)) - colours[int(order[pos])]).max() < 3


def test_atomic_write_respects_umask(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        A.atomic_write_json(tmp_path / "m.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644


def test_write_split_follows_the_contract_order(tmp_path):
    """write_split: positions in the seeded shuffle, contiguous shard blocks, checksums beside them."""
    records = [(f"c/{k}.JPEG", bytes([k]) * 10, k % 3) for k in range(11)]
    split = write_split(tmp_path, "train", records, 3, seed=4)
    order = A.shuffle_order(11, seed=4)
    assert [(s.first_position, s.stop_position) for s in split.shards] == A.shard_bounds(11, 3)
    got = [(A.parse_key(k), A.Datum.decode(v)) for s in split.shards for k, v in A.iter_shard(tmp_path / s.path)]
    assert [pos for (pos, _), _ in got] == list(range(11))
    assert [(rel, d.data, d.label) for (_, rel), d in got] == [records[int(order[p])] for p in range(11)]
    for s in split.shards:
        assert A.read_record_crcs(tmp_path / s.path).tolist() == [
            A.crc32(v) for _, v in A.iter_shard(tmp_path / s.path)
        ]
    identity = write_split(tmp_path / "id", "val", records, 1, seed=None)
    assert [A.parse_key(k)[1] for k, _ in A.iter_shard(tmp_path / "id" / identity.shards[0].path)] == [
        r[0] for r in records
    ]


@contextlib.contextmanager
def _read_only_view(src, at):
    """``src`` seen through a read-only bind mount at ``at`` (skips where mounts are not allowed)."""
    at.mkdir()
    if subprocess.run(["mount", "--bind", str(src), str(at)], capture_output=True).returncode:
        pytest.skip("cannot bind-mount a read-only view here")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(at)], check=True, capture_output=True)
        yield at
    finally:
        subprocess.run(["umount", str(at)], check=False)


def _pair(seed: int) -> tuple[A.Stats, np.ndarray]:
    rng = np.random.default_rng(seed)
    mean_image = rng.uniform(0, 255, A.MEAN_IMAGE_SHAPE).astype(np.float32)
    stats = A.Stats(
        mean_rgb=mean_image.reshape(-1, 3).mean(0).tolist(),
        eigval=[3.0, 2.0, 1.0],
        eigvec=np.eye(3).tolist(),
        n_images=seed,
        n_pixels=seed * 256 * 256,
    )
    return stats, mean_image


def test_stats_pair_is_one_unit_wherever_the_writer_is_killed(tmp_path):
    """Stopped after each of write_stats' steps (the states a kill leaves), the pair read back is the
    old one before the commit point and the new one after it, never one file of each; the next writer
    tidies up (readers change nothing), and a reader of a read-only copy sees the same pair."""
    old, new = _pair(1), _pair(2)
    steps = A.stats_steps(tmp_path / "probe", *new)
    commit_point = 5  # after prepare, two files, fsync, rename: the pair is new
    for done in range(len(steps) + 1):
        data = tmp_path / f"after-{done}"
        A.write_stats(data, *old)
        for step in A.stats_steps(data, *new)[:done]:
            step()
        want = new if done >= commit_point else old
        left = sorted(p.name for p in data.iterdir())
        with _read_only_view(data, tmp_path / f"ro-{done}") as ro:
            for where in (ro, data):  # the read-only view first: it cannot be tidied
                stats, mean = A.read_stats(where), A.read_mean_image(where)
                assert stats.n_images == want[0].n_images and np.array_equal(mean, want[1]), (done, where)
        assert sorted(p.name for p in data.iterdir()) == left, done  # a reader moves nothing under a writer
        A.write_stats(data, *new)  # the next writer tidies up what a killed one left
        assert sorted(p.name for p in data.iterdir()) == [A.MEAN_IMAGE_FILE, A.STATS_FILE], done
