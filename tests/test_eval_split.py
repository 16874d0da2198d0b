"""``alexnet-train eval --split val|test``: a test split is scored like val; a checkpoint of another class set
is refused in one line, except on a test set of a subset of its classes (ImageNetV2), scored with its full
output on the checkpoint's mean (such a set has no train split, so no mean of its own)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from _writers import write_split
from click.testing import CliRunner

from alexnet.pipeline import artifacts as A
from alexnet.trainer import checkpoint as ckpt_io
from alexnet.trainer.predict import load_predictor
from alexnet.trainer.rundir import RunDir, read_log


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A dataset with a test split made of the val records, and a checkpoint after 3 training steps."""
    from _train_fixtures import trained_run

    data, ckpt = trained_run(tmp_path_factory.mktemp("eval_split"), val_per_class=3)
    m = A.read_manifest(data)
    records = [(A.parse_key(k)[1], d.data, d.label) for k, d in A.iter_records(data, "val")]
    m.splits["test"] = write_split(data, "test", records[::-1], 2, seed=5)  # another order, other shards
    A.write_manifest(data, m)
    return data, ckpt, records


def _eval(data, ckpt, *extra):
    from alexnet.trainer.cli import main

    args = ["eval", "--data-dir", str(data), "--gpus", "cpu", "--batch-size", "4", "--threads", "1", "--no-progress"]
    return CliRunner().invoke(main, [*args, "--checkpoint", str(ckpt), *extra])


def _figures(output: str) -> list[str]:
    return [line.split(":", 1)[1] for line in output.splitlines() if "top-1 error" in line]


def test_a_test_split_of_the_val_images_scores_exactly_the_val_figures(run):
    data, ckpt, _ = run
    val, test = _eval(data, ckpt, "--ten-crop"), _eval(data, ckpt, "--ten-crop", "--split", "test")
    assert val.exit_code == 0 and test.exit_code == 0, val.output + test.output
    assert "), test:" in test.output and "), val:" in val.output
    assert len(_figures(val.output)) == 2 and _figures(test.output) == _figures(val.output)
    logged = read_log(RunDir.of_checkpoint(ckpt).evals)
    assert [(r["split"], r["ten_crop"]) for r in logged][-4:] == [
        ("val", False),
        ("val", True),
        ("test", False),
        ("test", True),
    ]
    assert logged[-1]["top1_err"] == logged[-3]["top1_err"] and logged[-1]["images"] == logged[-3]["images"]


def _with_classes(ckpt, tmp_path, classes):
    ck = ckpt_io.load_checkpoint(ckpt)
    ck["dataset"]["classes"] = classes
    out = tmp_path / "other.pt"
    ckpt_io.save_checkpoint(out, ck)
    return out


def test_another_class_set_is_refused_in_one_line(run, tmp_path):
    data, ckpt, _ = run
    classes = A.read_manifest(data).classes
    other = _with_classes(ckpt, tmp_path, [*classes[:2], "n09999998", "n09999999"])
    for split in ("val", "test"):
        r = _eval(data, other, "--split", split)
        assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
        assert f"4 classes differ (first: n09999998, n09999999, {classes[2]}, {classes[3]})" in r.output


def test_a_test_set_of_a_subset_of_the_classes_is_scored_with_the_full_output(run, tmp_path):
    """ImageNetV2's case: only a test split, of 2 of the model's 4 classes, labelled in its own class list;
    its error is the model's (4-way output, checkpoint's mean) on those images, computed here by hand."""
    from alexnet.pipeline.loader import DataConfig, create_loader

    data, ckpt, records = run
    classes = A.read_manifest(data).classes
    keep = [1, 3]
    subset = tmp_path / "subset"
    mine = [(rel, jpeg, keep.index(label)) for rel, jpeg, label in records if label in keep]
    split = write_split(subset, "test", mine, 1, seed=0)
    A.write_manifest(subset, A.Manifest(classes=[classes[k] for k in keep], splits={"test": split}))
    r = _eval(subset, ckpt, "--split", "test")
    assert r.exit_code == 0, r.output
    assert "test (2 of the model's 4 classes, scored with its full 4-way output)" in r.output
    model = load_predictor(ckpt, torch.device("cpu")).model.eval()
    wrong = seen = 0
    for images, labels in create_loader(data, "val", DataConfig(num_threads=1), batch_size=4):
        with torch.no_grad():
            top = model(images).argmax(dim=1)
        chosen = np.isin(labels.numpy(), keep)
        wrong += int((top.numpy() != labels.numpy())[chosen].sum())
        seen += int(chosen.sum())
    line = next(x for x in r.output.splitlines() if "centre crop" in x)
    assert float(line.split("top-1 error")[1].split("%")[0]) == pytest.approx(100 * wrong / seen, abs=0.01)
    assert f"({seen} images)" in line
    shutil.rmtree(subset / "test")
