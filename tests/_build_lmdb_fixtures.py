"""Shared, cached inputs for the build-lmdb and verify tests: one awkward sample tree, one clean build.

Both are built once per test session under pytest's base temporary directory, whichever test
module asks first, and treated as read-only by the tests (copy before mutating).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from alexnet.pipeline import artifacts as A
from alexnet.tools.cli import main as prep_main
from alexnet.tools.sample import make_sample

SAMPLE_KW = dict(num_classes=4, train_per_class=12, val_per_class=4, val_format="folders", awkward=True, seed=0)
# Options shared by the clean build and the interrupted one (shards and seed decide the bytes).
BUILD_ARGS = ["--train-shards", "3", "--val-shards", "2", "--seed", "3", "--no-progress"]


def sample_tree(base: Path) -> Path:
    root = base / "build_lmdb_sample"
    if not (root / "sample_info.json").exists():
        make_sample(root, **SAMPLE_KW)
    return root


def sample_info(root: Path) -> dict:
    return json.loads((root / "sample_info.json").read_text())


def run_prep(args: list[str]):
    """``alexnet-prep ARGS`` in-process; returns click's Result (exit_code, output)."""
    return CliRunner().invoke(prep_main, args, catch_exceptions=False)


def build(src: Path, data: Path, *extra: str):
    """``build-lmdb SRC --data-dir DATA`` with 2 workers and the shared options; it must succeed. click's Result."""
    r = run_prep(["build-lmdb", str(src), "--data-dir", str(data), "--workers", "2", *BUILD_ARGS, *extra])
    assert r.exit_code == 0, r.output
    return r


def clean_build(base: Path) -> Path:
    data = base / "build_lmdb_clean"
    manifest = data / A.MANIFEST_FILE
    if not manifest.exists() or not A.read_manifest(data, require_complete=False).complete:
        src = sample_tree(base)
        r = run_prep(["build-lmdb", str(src), "--data-dir", str(data), "--workers", "2", *BUILD_ARGS, "--overwrite"])
        assert r.exit_code == 0, r.output
    return data


def all_records(data_dir: Path) -> dict[str, list[tuple[bytes, bytes]]]:
    """Every (key, value) of every split, shard by shard in manifest order (shards not started yet: none)."""
    m = A.read_manifest(data_dir, require_complete=False)
    return {
        split: [
            kv
            for shard in m.shard_paths(data_dir, split)
            if (shard / "data.mdb").exists()
            for kv in A.iter_shard(shard)
        ]
        for split in m.splits
    }


def committed_records(data) -> int:
    """Records committed so far in the shards of a build in progress (read through LMDB's lock, as a reader)."""
    import lmdb

    n = 0
    for lock in data.glob("*/*/lock.mdb"):
        try:
            with lmdb.open(str(lock.parent), readonly=True, lock=True, subdir=True) as env:
                n += env.stat()["entries"]
        except lmdb.Error:  # the writer is creating it
            pass
    return n


def same_dataset(a: Path, b: Path) -> None:
    """Same keys, positions, labels and stored bytes in every shard; the same manifest but for the source."""
    assert all_records(a) == all_records(b)
    ma, mb = A.read_manifest(a), A.read_manifest(b)
    for field in ("classes", "class_names", "splits", "rejected", "build"):
        assert getattr(ma, field) == getattr(mb, field), field
    assert ma.source != mb.source
    assert (a / A.REJECTED_FILE).read_text() == (b / A.REJECTED_FILE).read_text()
    for split in ma.splits:
        for x, y in zip(ma.shard_paths(a, split), mb.shard_paths(b, split), strict=True):
            assert np.array_equal(A.read_record_crcs(x), A.read_record_crcs(y))
