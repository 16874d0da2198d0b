"""The built-in sample: deterministic, every val format, awkward files, the CLI."""

import hashlib
import io

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from alexnet.tools.cli import main as prep
from alexnet.tools.sample import AWKWARD_KINDS, REAL_WNIDS, VAL_FORMATS, class_wnids, make_sample


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "sample_info.json":  # it records the root path
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_deterministic(tmp_path):
    a = make_sample(tmp_path / "a", num_classes=3, train_per_class=3, val_per_class=2, seed=5)
    b = make_sample(tmp_path / "b", num_classes=3, train_per_class=3, val_per_class=2, seed=5)
    c = make_sample(tmp_path / "c", num_classes=3, train_per_class=3, val_per_class=2, seed=6)
    assert a.classes == b.classes
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")
    files_a = {p.relative_to(tmp_path / "a"): p.read_bytes() for p in (tmp_path / "a").rglob("*.JPEG")}
    files_b = {p.relative_to(tmp_path / "b"): p.read_bytes() for p in (tmp_path / "b").rglob("*.JPEG")}
    files_c = {p.relative_to(tmp_path / "c"): p.read_bytes() for p in (tmp_path / "c").rglob("*.JPEG")}
    assert files_a == files_b
    train_a = {k for k in files_a if k.parts[0] == "train"}
    assert train_a == {k for k in files_c if k.parts[0] == "train"}
    assert all(files_a[k] != files_c[k] for k in train_a)  # another seed draws other images
    assert c.train_images == 9


def test_wnids_real_and_sorted():
    w = class_wnids(10)
    assert w == sorted(w) and set(w) <= set(REAL_WNIDS)
    many = class_wnids(40)
    assert len(set(many)) == 40 and all(len(x) == 9 and x[0] == "n" and x[1:].isdigit() for x in many)


@pytest.mark.parametrize("fmt", VAL_FORMATS)
def test_val_formats(tmp_path, fmt):
    info = make_sample(tmp_path, num_classes=4, train_per_class=1, val_per_class=3, val_format=fmt)
    val_files = sorted((tmp_path / info.val_dir).rglob("*.JPEG"))
    assert len(val_files) == 12 == info.val_images
    if fmt == "folders":
        assert {p.parent.name for p in val_files} == set(info.classes)
        assert all(info.val_labels[p.name] == p.parent.name for p in val_files)
    else:
        assert {p.parent for p in val_files} == {tmp_path / info.val_dir}  # flat
    if fmt == "kaggle":
        rows = (tmp_path / "LOC_val_solution.csv").read_text().splitlines()
        assert rows[0] == "ImageId,PredictionString"
        image_id, pred = rows[1].split(",")
        assert info.val_labels[image_id + ".JPEG"] == pred.split()[0]
        assert (tmp_path / "ILSVRC/Data/CLS-LOC/train").is_dir()
    if fmt == "devkit":
        from scipy.io import loadmat

        syn = loadmat(str(tmp_path / "ILSVRC2012_devkit_t12/data/meta.mat"))["synsets"]
        id_to_wnid = {int(syn[i, 0]["ILSVRC2012_ID"].item()): str(syn[i, 0]["WNID"][0]) for i in range(syn.shape[0])}
        ids = (tmp_path / "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt").read_text().split()
        names = sorted(info.val_labels)
        assert [id_to_wnid[int(i)] for i in ids] == [info.val_labels[n] for n in names]
        # The devkit's ID order is not the sorted-wnid order, as in the real one.
        assert [id_to_wnid[i + 1] for i in range(4)] != sorted(info.classes)
    if fmt == "list":
        lines = (tmp_path / "val_list.txt").read_text().splitlines()
        assert all(info.val_labels[rel] == wnid for rel, wnid in (ln.split() for ln in lines))


def test_awkward_files(tmp_path):
    info = make_sample(tmp_path, num_classes=3, train_per_class=1, val_per_class=1, awkward=True)
    assert set(info.awkward) == set(AWKWARD_KINDS)

    def _open(kind):
        return Image.open(io.BytesIO((tmp_path / info.awkward[kind]).read_bytes()))

    assert _open("cmyk").mode == "CMYK"
    assert _open("png_named_jpeg").format == "PNG" and info.awkward["png_named_jpeg"].endswith(".JPEG")
    assert _open("grayscale").mode == "L"
    assert _open("tiny").size == (31, 23)
    assert _open("very_large").size == (4000, 3000)
    assert _open("exif_rotated").getexif()[0x0112] == 6
    assert (tmp_path / info.awkward["zero_byte"]).stat().st_size == 0
    with pytest.raises(OSError):
        _open("truncated").load()
    assert sorted(info.rejected) == sorted([info.awkward["truncated"], info.awkward["zero_byte"]])


def test_classes_are_separable_by_colour(tmp_path):
    """The sample must be learnable: a nearest-class-mean colour classifier already beats chance clearly."""
    info = make_sample(tmp_path, num_classes=6, train_per_class=6, val_per_class=4)

    def feats(paths):
        out = []
        for p in paths:
            a = np.asarray(Image.open(p).convert("RGB"), dtype=np.float64)
            sat = a.max(axis=2) - a.min(axis=2)
            out.append(a[sat > np.percentile(sat, 90)].mean(axis=0))  # the colour of the most saturated pixels
        return np.array(out)

    centres = np.array([feats(sorted((tmp_path / "train" / w).glob("*.JPEG"))).mean(0) for w in info.classes])
    names = sorted(info.val_labels)
    x = feats([tmp_path / "val" / info.val_labels[n] / n for n in names])
    pred = np.argmin(((x[:, None] - centres[None]) ** 2).sum(-1), axis=1)
    truth = np.array([info.classes.index(info.val_labels[n]) for n in names])
    assert (pred == truth).mean() > 0.8  # chance is 1/6


def test_cli(tmp_path):
    r = CliRunner().invoke(
        prep, ["make-sample", str(tmp_path / "s"), "--classes", "2", "--train-per-class", "1", "--val-per-class", "1"]
    )
    assert r.exit_code == 0, r.output
    assert "wrote 2 train and 2 val images in 2 classes" in r.output
    r = CliRunner().invoke(prep, ["make-sample", str(tmp_path / "s")])
    assert r.exit_code == 1 and "not empty" in r.output
