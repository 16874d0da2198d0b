"""ImageNetV2 downloads (a tar.gz of ``<variant>-format-val/<i>/<hash>.jpeg``) build a test-only dataset
labelled by wnid through the shipped ILSVRC-2012 class list, the same from the tar.gz as from its folder."""

import pytest
from _build_lmdb_fixtures import all_records, run_prep, same_dataset
from _writers import write_imagenetv2

from alexnet.pipeline import artifacts as A
from alexnet.tools.imagenetv2 import CLASS_LIST, ilsvrc2012_classes
from alexnet.tools.sample import make_sample

ARGS = ["--workers", "2", "--seed", "3", "--no-progress"]


def test_the_shipped_class_list_is_ilsvrc2012s_1000_sorted_wnids_with_their_source():
    classes = ilsvrc2012_classes()
    wnids = [w for w, _ in classes]
    assert len(set(wnids)) == 1000 and wnids == sorted(wnids)
    assert classes[0] == ("n01440764", "tench, Tinca tinca") and classes[-1][0] == "n15075141"
    assert dict(classes)["n02012849"] == dict(classes)["n03126707"] == "crane"  # the canonical text, not an edit
    assert "LOC_synset_mapping.txt" in CLASS_LIST.read_text().splitlines()[3]


@pytest.fixture(scope="module")
def download(tmp_path_factory):
    base = tmp_path_factory.mktemp("imagenetv2")
    info = make_sample(base / "sample", num_classes=12, train_per_class=1, val_per_class=3, seed=1)
    chosen = [info.classes[k] for k in (1, 3, 10, 11)]  # indices 1, 3, 217, 482 among the 1000
    return write_imagenetv2(base / "sample", base / "v2", chosen), chosen, base


def test_tar_gz_and_folder_build_the_same_test_only_dataset(download, tmp_path):
    tgz, chosen, _ = download
    index = {w: i for i, (w, _) in enumerate(ilsvrc2012_classes())}
    assert sorted(index[w] for w in chosen) == [1, 3, 217, 482]
    for src, data in ((tgz, tmp_path / "a"), (tgz.parent / "imagenetv2-matched-frequency-format-val", tmp_path / "b")):
        r = run_prep(["build-lmdb", str(src), "--data-dir", str(data), *ARGS])
        assert r.exit_code == 0, r.output
    same_dataset(tmp_path / "a", tmp_path / "b")
    m = A.read_manifest(tmp_path / "a")
    assert list(m.splits) == ["test"] and m.splits["test"].num_records == 12 and m.splits["test"].layout == "imagenetv2"
    assert m.classes == sorted(chosen) and m.class_names == [dict(ilsvrc2012_classes())[w] for w in m.classes]
    for key, value in all_records(tmp_path / "a")["test"]:
        rel = A.parse_key(key)[1]
        assert index[m.classes[A.Datum.decode(value).label]] == int(rel.split("/")[0])  # labelled by wnid
    # The folder holding the download is SRC too; a build of train or val from it says what it is.
    r = run_prep(["build-lmdb", str(tgz.parent), "--data-dir", str(tmp_path / "c"), "--splits", "train", *ARGS])
    assert r.exit_code == 1 and "is ImageNetV2, a test set only" in r.output and "Traceback" not in r.output
