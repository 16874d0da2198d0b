"""ILSVRC-2010 as downloaded (the paper's Table 1): its archives read in place, patches and gzip-wrapped
members included, build the same dataset as the release extracted and patched by hand."""

import gzip
import shutil

import pytest
from _build_lmdb_fixtures import all_records, build, run_prep, same_dataset
from _writers import UNUSED_PATCH_2010, banner_jpeg, write_2010_archives, write_2010_tree

from alexnet.pipeline import artifacts as A
from alexnet.tools import archives as AR
from alexnet.tools.sample import class_name, make_sample
from alexnet.tools.sources import detect_source

SAMPLE_KW = dict(num_classes=4, train_per_class=12, val_per_class=4, val_format="devkit", awkward=True, seed=0)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(2010 tree, its archives' folder, what was gzip-wrapped and patched, the tree's build, base)."""
    base = tmp_path_factory.mktemp("ilsvrc2010")
    make_sample(base / "sample", **SAMPLE_KW)
    odd = write_2010_tree(base / "sample", base / "tree")
    write_2010_archives(base / "tree", base / "archives", odd["patched"])
    r = build(base / "tree", base / "tree_data")
    return base / "tree", base / "archives", odd, base / "tree_data", r.output, base


def test_tree_has_train_val_test_with_2010_labels_and_meta_names(release):
    tree, _, odd, tree_data, output, _ = release
    m = A.read_manifest(tree_data)
    assert list(m.splits) == ["train", "val", "test"]
    assert m.splits["val"].layout == m.splits["test"].layout == "devkit"
    assert m.class_names == [class_name(i, len(m.classes)) for i in range(len(m.classes))]  # meta.mat's words
    # The gzip-wrapped files are kept, unwrapped, and counted with the other conversions.
    assert {s: m.splits[s].conversions.get("gzip") for s in m.splits} == {"train": 1, "val": 1, "test": 1}
    assert m.splits["train"].conversions == {"cmyk": 1, "gzip": 1, "grey": 1, "png": 1}
    assert "converted on the way, and kept: cmyk 1, grey 1, gzip 3, png 1" in output
    # Test labels come from ILSVRC2010_test_ground_truth.txt: the test files are the val files reversed.
    src = detect_source(tree)
    val, test = src.splits["val"], src.splits["test"]
    assert test.wnids == val.wnids[::-1] and len(set(val.wnids)) == len(m.classes)
    assert all((tree / rel).read_bytes()[:2] == gzip.compress(b"")[:2] for rel in odd["gzipped"])


def test_archives_build_equals_the_tree_extracted_and_patched_by_hand(release, tmp_path):
    tree, archives, odd, tree_data, _, _ = release
    r = build(archives, tmp_path / "d")
    same_dataset(tmp_path / "d", tree_data)
    # Each patched file was a banner in its main tar: the records hold the replacement, not the banner.
    warning = [line for line in r.output.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and AR.ILSVRC2010["patch"] in warning[0] and UNUSED_PATCH_2010.split("/")[1] in warning[0]
    src = detect_source(archives)
    for rel in odd["patched"]:
        split, name = rel.split("/")[0], rel.split("/", 1)[1]
        loc = src.splits[split].locations[src.splits[split].relpaths.index(name)]
        assert int(loc["archive"]) == AR.ARCHIVE_ROLES.index("patch")
    m = A.read_manifest(tmp_path / "d")
    assert m.source["splits"]["test"]["archives"][2].endswith(AR.ILSVRC2010["test"])
    r = run_prep(["verify", "--data-dir", str(tmp_path / "d"), "--no-progress"])
    assert r.exit_code == 0 and "ok:" in r.output, r.output


def test_without_the_patches_the_banners_are_built(release, tmp_path):
    """The patch archive matters: without it the build holds the banners (so the equality above is not vacuous)."""
    _, archives, odd, tree_data, _, _ = release
    bare = tmp_path / "bare"
    bare.mkdir()
    for role, name in AR.ILSVRC2010.items():
        if role != "patch":
            (bare / name).symlink_to(archives / name)
    build(bare, tmp_path / "d")
    a, b = all_records(tmp_path / "d"), all_records(tree_data)
    differ = {s: sum(x != y for x, y in zip(a[s], b[s], strict=True)) for s in a}
    assert differ == {"train": 1, "val": 1, "test": 1}
    assert len(banner_jpeg()) > 0


def test_test_split_only_and_missing_test_ground_truth(release, tmp_path):
    _, archives, _, tree_data, _, _ = release
    build(archives / AR.ILSVRC2010["test"], tmp_path / "t", "--splits", "test")
    assert list(A.read_manifest(tmp_path / "t").splits) == ["test"]
    assert all_records(tmp_path / "t")["test"] == all_records(tree_data)["test"]
    partial = tmp_path / "no_gt"
    partial.mkdir()
    for role, name in AR.ILSVRC2010.items():
        if role != "test_labels":
            (partial / name).symlink_to(archives / name)
    r = build(partial, tmp_path / "d", "--splits", "train,val,test")
    assert "no test split: ILSVRC2010_test_ground_truth.txt" in r.output
    assert list(A.read_manifest(tmp_path / "d").splits) == ["train", "val"]


def test_a_resumed_build_counts_the_conversions_of_what_was_committed(release, tmp_path):
    """The conversions of records committed before an interruption are not lost: a shard's count is kept beside
    it, and records committed after its last write (here: all of them) are counted again from their sources."""
    tree, _, _, tree_data, _, _ = release
    data = tmp_path / "d"
    shutil.copytree(tree_data, data)
    m = A.read_manifest(data)
    m.complete = False
    A.write_manifest(data, m)
    for split in m.splits:
        for shard in m.shard_paths(data, split):
            (shard / A.CONVERSIONS_FILE).unlink()
    r = build(tree, data)
    assert "after resuming" in r.output
    assert A.read_manifest(data).splits == A.read_manifest(tree_data).splits
