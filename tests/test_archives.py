"""build-lmdb from ImageNet's archives (image-net.org's tars, Kaggle's zip), read in place.

The archives are written inside the test session from the awkward sample tree; a build from them
must equal the build of the tree, record for record; a damaged archive stops the build with one
line naming it and the member, and what was built is kept.
"""

import io
import os
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zipfile

import numpy as np
import pytest
from _build_lmdb_fixtures import BUILD_ARGS, all_records, build, committed_records, run_prep, same_dataset
from _writers import write_kaggle_zip, write_official_archives
from PIL import Image

from alexnet.pipeline import artifacts as A
from alexnet.pipeline import locks as L
from alexnet.tools import archives as AR
from alexnet.tools.sample import class_name, make_sample
from alexnet.tools.sources import detect_source

SAMPLE_KW = dict(num_classes=4, train_per_class=12, val_per_class=4, awkward=True, seed=0)


def _build(src, data, *extra):
    build(src, data, *extra)
    return data


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """(tree, its archives' folder, the tree's build, the archives' build): devkit validation labels."""
    base = tmp_path_factory.mktemp("official")
    make_sample(base / "tree", val_format="devkit", **SAMPLE_KW)
    write_official_archives(base / "tree", base / "archives")
    shutil.copy(base / "tree" / "LOC_synset_mapping.txt", base / "archives")
    return base / "tree", base / "archives", _build(base / "tree", base / "tree_data"), base


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory):
    base = tmp_path_factory.mktemp("kaggle")
    make_sample(base / "tree", val_format="kaggle", **SAMPLE_KW)
    (base / "zips").mkdir()
    write_kaggle_zip(base / "tree", base / "zips" / AR.KAGGLE_ZIP)
    return base / "tree", base / "zips" / AR.KAGGLE_ZIP, _build(base / "tree", base / "tree_data"), base


def test_official_archives_build_equals_the_tree(official):
    tree, archives, tree_data, base = official
    data = _build(archives, base / "archive_data")
    same_dataset(data, tree_data)
    m = A.read_manifest(data)
    assert m.splits["val"].layout == "devkit" and len(m.rejected) == 2  # the truncated and the zero-byte file
    assert m.source["splits"]["train"]["archives"][0].endswith(AR.OFFICIAL_TRAIN)
    # SRC may also be one of the archives, with the others beside it; verify passes on the result.
    one = detect_source(archives / AR.OFFICIAL_VAL)
    assert {n: s.digest() for n, s in one.splits.items()} == {
        n: s.digest() for n, s in detect_source(tree).splits.items()
    }
    r = run_prep(["verify", "--data-dir", str(data), "--no-progress"])
    assert r.exit_code == 0 and "ok:" in r.output, r.output


@pytest.mark.parametrize("compression", [zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED])
def test_kaggle_zip_build_equals_the_tree(kaggle, compression, tmp_path):
    tree, zpath, tree_data, _ = kaggle
    if compression != zipfile.ZIP_DEFLATED:
        zpath = write_kaggle_zip(tree, tmp_path / AR.KAGGLE_ZIP, compression)
    kinds = set(detect_source(zpath).splits["train"].locations["kind"].tolist())
    assert kinds == {AR.ZIP_DEFLATED if compression == zipfile.ZIP_DEFLATED else AR.ZIP_STORED}
    data = _build(zpath.parent, tmp_path / "d")  # the folder holding the zip
    same_dataset(data, tree_data)
    assert A.read_manifest(data).splits["val"].layout == "kaggle-csv"


def _error_line(r, *expected):
    assert r.exit_code == 1 and "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.output
    for text in expected:
        assert text in errors[0], errors[0]


def _snapshot(d):
    """The dataset's files; the lock file's holder record names each command that took the lock."""
    return {p: p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and p.name != L.LOCK_FILE}


def test_damaged_tars_stop_with_one_line_and_keep_what_was_built(official, tmp_path):
    _, archives, tree_data, _ = official
    bad = tmp_path / "bad"
    shutil.copytree(archives, bad)
    data = tmp_path / "d"
    shutil.copytree(tree_data, data)  # a finished dataset of the same source: must survive untouched
    before = _snapshot(data)
    train = bad / AR.OFFICIAL_TRAIN
    good = train.read_bytes()
    fd = os.open(train, os.O_RDONLY)
    inner = AR.tar_members(fd, 0, len(good), str(train))
    os.close(fd)
    # 1. The train tar cut in the middle of its second class tar (an interrupted download).
    name, offset, size = inner[1]
    train.write_bytes(good[: offset + size // 2])
    r = run_prep(["build-lmdb", str(bad), "--data-dir", str(data), *BUILD_ARGS])
    _error_line(r, str(train), f"member {name} is cut short", "download it again")
    # 2. A class tar whose third header is damaged (its checksum), or zeroed: tarfile ends such a
    # listing quietly (an end-of-archive block) and the data after it must not be ignored.
    fd = os.open(archives / AR.OFFICIAL_TRAIN, os.O_RDONLY)
    members = AR.tar_members(fd, offset, size, "x")
    os.close(fd)
    header = members[2][1] - 512
    train.write_bytes(good[: header + 148] + b"garbage!" + good[header + 156 :])
    r = run_prep(["build-lmdb", str(bad), "--data-dir", str(data), *BUILD_ARGS])
    _error_line(r, str(train), f"member {name}", "download it again")
    train.write_bytes(good[:header] + bytes(512) + good[header + 512 :])
    r = run_prep(["build-lmdb", str(bad), "--data-dir", str(data), *BUILD_ARGS])
    _error_line(r, str(train), f"member {name}", "breaks off after", os.path.basename(members[1][0]))
    # 3. The validation tar cut inside a member.
    train.write_bytes(good)
    val = bad / AR.OFFICIAL_VAL
    fd = os.open(val, os.O_RDONLY)
    _, last, last_size = AR.tar_members(fd, 0, os.fstat(fd).st_size, "x")[-1]
    os.close(fd)
    val.write_bytes(val.read_bytes()[: last + last_size // 2])
    r = run_prep(["build-lmdb", str(bad), "--data-dir", str(data), *BUILD_ARGS])
    _error_line(r, str(val), "is cut short")
    assert _snapshot(data) == before


def test_unreadable_zip_entry_stops_the_build_and_the_same_command_resumes(kaggle, tmp_path):
    """A deflated member whose data is damaged: one line naming the zip and the member; the records
    committed before it stay, and once the zip is replaced the same command finishes the same dataset."""
    _, zpath, tree_data, _ = kaggle
    bad = tmp_path / AR.KAGGLE_ZIP
    good = zpath.read_bytes()
    train = detect_source(zpath).splits["train"]
    # The member stored last in its shard's block, so that the records before it are committed first.
    n = len(train)
    order = A.shuffle_order(n, 3)
    victim = int(order[A.shard_bounds(n, 3)[0][1] - 1])
    rel, loc = train.relpaths[victim], train.locations[victim]
    with zipfile.ZipFile(zpath) as zf:
        info = zf.getinfo(f"{AR.KAGGLE_DATA}train/{rel}")
    assert int(loc["offset"]) == info.header_offset
    name_len, extra_len = struct.unpack("<HH", good[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len  # the member's deflated data
    mid = start + info.compress_size // 2
    bad.write_bytes(good[:mid] + bytes(64) + good[mid + 64 :])
    data = tmp_path / "d"
    args = ["build-lmdb", str(bad), "--data-dir", str(data), "--workers", "1", "--commit-every", "1", *BUILD_ARGS]
    r = run_prep(args)
    _error_line(r, str(bad), f"member {rel} cannot be read", "download it again")
    assert not A.read_manifest(data, require_complete=False).complete
    assert sum(len(v) for v in all_records(data).values()) >= 1
    bad.write_bytes(good)
    r = run_prep(args)
    assert r.exit_code == 0 and "after resuming" in r.output, r.output
    same_dataset(data, tree_data)


# --------------------------------------------------------------------------- kill -9 and resume

SLOW_IMAGES = 64  # 2400x1800 gradient PNGs: 17 KB in the archive, ~40 ms each to decode and resize
BUILD_CMD = [sys.executable, "-m", "alexnet.tools.cli", "build-lmdb"]


@pytest.fixture(scope="module")
def slow_archives(tmp_path_factory):
    base = tmp_path_factory.mktemp("slow")
    make_sample(base / "tree", val_format="devkit", **SAMPLE_KW)
    x = np.linspace(0, 255, 2400)[None, :, None] * np.ones((1800, 1, 3))
    x[..., 1] = np.linspace(0, 255, 1800)[:, None]
    buf = io.BytesIO()
    Image.fromarray(x.astype(np.uint8)).save(buf, format="PNG", compress_level=9)
    wnids = sorted(p.name for p in (base / "tree" / "train").iterdir())
    for k in range(SLOW_IMAGES):
        (base / "tree" / "train" / wnids[k % len(wnids)] / f"slow_{k}.png").write_bytes(buf.getvalue())
    write_official_archives(base / "tree", base / "archives")
    clean = _build(base / "archives", base / "clean")
    return base / "archives", clean


@pytest.mark.parametrize("at_least", [2, 12])
def test_killed_archive_build_resumes_to_the_same_records(slow_archives, tmp_path, at_least):
    src, clean = slow_archives
    data = tmp_path / "d"
    cmd = [*BUILD_CMD, str(src), "--data-dir", str(data), "--workers", "2", "--commit-every", "2", *BUILD_ARGS]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and committed_records(data) < at_least:
        time.sleep(0.01)
    stopped_part_way = proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert stopped_part_way, "the build ended before it could be killed"
    partial = sum(len(v) for v in all_records(data).values())
    assert at_least <= partial < sum(len(v) for v in all_records(clean).values())
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "after resuming" in r.stdout, r.stderr
    assert all_records(data) == all_records(clean)
    assert A.read_manifest(data).splits == A.read_manifest(clean).splits


def test_not_an_archive_and_no_archives(tmp_path):
    (tmp_path / "x.tar").write_bytes(b"not a tar")
    r = run_prep(["build-lmdb", str(tmp_path / "x.tar"), "--data-dir", str(tmp_path / "d")])
    _error_line(r, "is not one of ImageNet's archives")
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / AR.KAGGLE_ZIP).write_bytes(b"PK but not really a zip")
    r = run_prep(["build-lmdb", str(tmp_path / "z"), "--data-dir", str(tmp_path / "d")])
    _error_line(r, AR.KAGGLE_ZIP, "not a readable zip")
    with tarfile.open(tmp_path / AR.OFFICIAL_TRAIN, "w"):
        pass  # an empty train tar
    r = run_prep(["build-lmdb", str(tmp_path / AR.OFFICIAL_TRAIN), "--data-dir", str(tmp_path / "d")])
    _error_line(r, "holds no train images")


def test_official_archives_name_classes_from_meta_words(official, tmp_path):
    """Without a class-name file beside them, the devkit's meta.mat names the classes (not their wnids)."""
    _, archives, _, _ = official
    for name in AR.OFFICIAL.values():
        (tmp_path / name).symlink_to(archives / name)
    src = detect_source(tmp_path)
    assert src.class_names == tuple(class_name(i, len(src.classes)) for i in range(len(src.classes)))
