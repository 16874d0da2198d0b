"""Source-tree detection: train class folders (plain and Kaggle), every validation label format, labels."""

import shutil

import numpy as np
import pytest
from _build_lmdb_fixtures import run_prep

from alexnet.pipeline.errors import AlexnetError
from alexnet.tools import layouts as L
from alexnet.tools.sample import DEVKIT_DIR, make_sample
from alexnet.tools.sources import detect_source

FORMATS = {"folders": "class-folders", "kaggle": "kaggle-csv", "devkit": "devkit", "list": "list"}


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """One small sample tree per validation format (6 classes: enough for a non-trivial devkit ID order)."""
    base = tmp_path_factory.mktemp("layouts")
    return {
        fmt: (base / fmt, make_sample(base / fmt, num_classes=6, train_per_class=2, val_per_class=2, val_format=fmt))
        for fmt in FORMATS
    }


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_val_format_detected_with_right_labels(trees, fmt):
    root, info = trees[fmt]
    src = detect_source(root)
    assert src.classes == info.classes == sorted(info.classes)
    train, val = src.splits["train"], src.splits["val"]
    assert train.layout == "class-folders" and val.layout == FORMATS[fmt]
    assert train.root == root / info.train_dir  # the Kaggle copy's ILSVRC/Data/CLS-LOC/train included
    assert len(train) == info.train_images and len(val) == info.val_images
    assert list(train.relpaths) == sorted(train.relpaths) and list(val.relpaths) == sorted(val.relpaths)
    # Every validation file gets the wnid the sample generator drew it as ...
    for rel, wnid in zip(val.relpaths, val.wnids, strict=True):
        assert wnid == info.val_labels[rel.split("/")[-1]]
    # ... and labels are indices in the sorted wnids, the same in both splits.
    labels = val.labels(src.classes)
    assert labels.tolist() == [info.classes.index(w) for w in val.wnids]
    assert train.labels(src.classes).tolist() == [info.classes.index(r.split("/")[0]) for r in train.relpaths]


def test_devkit_id_order_is_not_label_order(trees):
    """ground_truth.txt holds ILSVRC2012_IDs in meta.mat's order; labels must come through the wnid."""
    root, info = trees["devkit"]
    id_to_wnid = L.read_devkit_meta(root / DEVKIT_DIR / "meta.mat")
    assert sorted(id_to_wnid.values()) == info.classes  # leaves only: the internal nodes are dropped
    id_order = [id_to_wnid[i] for i in sorted(id_to_wnid)]
    assert id_order != info.classes  # the sample's IDs are shuffled, as in the real devkit
    gt = [int(x) for x in (root / DEVKIT_DIR / "ILSVRC2012_validation_ground_truth.txt").read_text().split()]
    src = detect_source(root)
    val = src.splits["val"]
    labels = val.labels(src.classes)
    for rel, label in zip(val.relpaths, labels, strict=True):
        number = int(rel.split("_")[-1].split(".")[0])
        ilsvrc_id = gt[number - 1]
        assert src.classes[label] == id_to_wnid[ilsvrc_id]
    # Reading the ID as a label (ID - 1) would be wrong for at least one file.
    wrong = [gt[int(r.split("_")[-1].split(".")[0]) - 1] - 1 for r in val.relpaths]
    assert wrong != labels.tolist()


def test_caffe_val_txt_with_integer_labels(trees, tmp_path):
    """A 'relpath label' list (Caffe's val.txt): integers index the sorted wnids of the train classes."""
    root, info = trees["list"]
    tree = tmp_path / "t"
    shutil.copytree(root, tree)
    (tree / "val_list.txt").unlink()
    names = sorted(info.val_labels)
    (tree / "val.txt").write_text("".join(f"{n} {info.classes.index(info.val_labels[n])}\n" for n in names))
    val = detect_source(tree).splits["val"]
    assert val.layout == "list" and val.label_file.endswith("val.txt")
    assert list(val.wnids) == [info.val_labels[n] for n in val.relpaths]
    (tree / "val.txt").write_text("".join(f"{n} 99\n" for n in names))
    with pytest.raises(AlexnetError, match="outside"):
        detect_source(tree)


def test_forced_layout_and_explicit_label_file(trees, tmp_path):
    root, info = trees["kaggle"]
    tree = tmp_path / "t"
    shutil.copytree(root, tree)
    moved = tmp_path / "labels.csv"
    (tree / "LOC_val_solution.csv").rename(moved)
    with pytest.raises(AlexnetError, match="no label file"):
        detect_source(tree)
    val = detect_source(tree, val_labels=moved).splits["val"]
    assert val.layout == "kaggle-csv"
    assert list(val.wnids) == [info.val_labels[n] for n in val.relpaths]
    # Forcing a layout whose file is absent is a clear error, not a silent fallback.
    with pytest.raises(AlexnetError, match="no label file"):
        detect_source(tree, val_layout="devkit")


def test_missing_class_is_an_error_unless_allowed(trees, tmp_path):
    root, info = trees["folders"]
    tree = tmp_path / "t"
    shutil.copytree(root, tree)
    shutil.rmtree(tree / "val" / info.classes[2])
    with pytest.raises(AlexnetError, match=f"1 of 6 classes have no val images.*{info.classes[2]}"):
        detect_source(tree)
    src = detect_source(tree, allow_missing_classes=True)
    assert src.classes == info.classes  # labels stay the same in every split
    assert any("no val images" in n for n in src.notes)


def test_bad_trees_give_one_clear_error(tmp_path, trees):
    with pytest.raises(AlexnetError, match="no ImageNet splits"):
        detect_source(tmp_path)
    with pytest.raises(AlexnetError, match="not a directory"):
        detect_source(tmp_path / "nope")
    # A flat validation file the label file does not know.
    root, _ = trees["list"]
    tree = tmp_path / "t"
    shutil.copytree(root, tree)
    shutil.copy(tree / "val" / "ILSVRC2012_val_00000001.JPEG", tree / "val" / "ILSVRC2012_val_00009999.JPEG")
    with pytest.raises(AlexnetError, match="1 files have no label"):
        detect_source(tree)
    # Through the CLI: one 'error:' line and exit status 1.
    r = run_prep(["build-lmdb", str(tmp_path / "t"), "--data-dir", str(tmp_path / "d")])
    assert r.exit_code == 1
    assert "Traceback" not in r.output and "error: 1 files have no label" in r.output


def test_only_train_split(trees, tmp_path):
    root, info = trees["folders"]
    tree = tmp_path / "t"
    shutil.copytree(root / "train", tree / "train")
    src = detect_source(tree)
    assert list(src.splits) == ["train"] and any("no val split" in n for n in src.notes)
    assert np.array_equal(np.unique(src.splits["train"].labels(src.classes)), np.arange(len(info.classes)))


def test_class_names_come_from_the_first_mapping_file(tmp_path):
    from alexnet.tools.layouts import read_class_names

    assert read_class_names(tmp_path, ["n1", "n2"]) == []  # none: the wnids alone are used
    (tmp_path / "synsets.txt").write_text("n1 ignored\n")
    (tmp_path / "LOC_synset_mapping.txt").write_text("n2 goldfish, Carassius auratus\nn1 tench, Tinca tinca\n")
    assert read_class_names(tmp_path, ["n1", "n2", "n3"]) == ["tench, Tinca tinca", "goldfish, Carassius auratus", "n3"]


def test_sample_writes_class_names_that_build_lmdb_records(tmp_path):
    from alexnet.pipeline.artifacts import read_manifest
    from alexnet.tools.build_lmdb import BuildConfig, build_lmdb
    from alexnet.tools.sample import class_name, make_sample

    info = make_sample(tmp_path / "src", num_classes=3, train_per_class=2, val_per_class=1)
    build_lmdb(BuildConfig(source=tmp_path / "src", data_dir=tmp_path / "data", workers=1, progress=False))
    manifest = read_manifest(tmp_path / "data")
    assert manifest.class_names == [class_name(i, 3) for i in range(3)] and info.classes == manifest.classes


def test_no_import_cycle_among_the_tools():
    """archives.py builds on layouts.py, sources.py chooses between them: no tools module imports back up."""
    from pathlib import Path

    from test_layering import imported_modules

    tools = Path(__file__).resolve().parents[1] / "tools"
    graph = {
        p.stem: {m.split(".")[2] for _, m in imported_modules(p, "tools") if m.startswith("alexnet.tools.")}
        for p in tools.glob("*.py")
    }

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == target or (nxt not in seen and reaches(nxt, target, seen | {nxt})):
                return True
        return False

    cycles = sorted(m for m in graph if reaches(m, m, set()))
    assert not cycles, f"tools modules in an import cycle: {cycles}"
    assert "archives" in graph["sources"] and "layouts" in graph["archives"]  # the checker sees the imports
