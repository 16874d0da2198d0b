"""The table of bad inputs (issue 23): every command, run in-process as a user runs it, answers each bad
input with one line that names the thing (and the fix) and a non-zero exit, never a traceback; what was
already written stays (the previous checkpoint still loads).

Each row: the command line (``{name}`` fills in a path of the world below), what to do first, the exit
status and a piece of the line it must print. Click's own usage errors (exit 2) print a short usage
block ending in the ``Error:`` line.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from alexnet.tools.cli import main as prep
from alexnet.trainer import checkpoint as ckpt_io
from alexnet.trainer.cli import main as train

SHARD_FIX = "rebuild the dataset (alexnet-prep build-lmdb"
RECORD_FIX = "is not a decodable image"  # the record's key and shard, then "alexnet-prep verify"
NOT_PT = "not a PyTorch file (it begins 'epoch 3 notes')"
EMPTY = "the file is empty"
TRUNCATED = "truncated or damaged"
OTHER = "not a PyTorch file (it begins binary data)"
UNDER_FILE = "a part of the path is a file, not a directory"
FULL = "No space left on device"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A dataset (4 classes) and one of 6, a checkpoint trained on the first, a sample tree, and the bad
    things: a regular file, non-checkpoints, datasets with a missing or a damaged shard."""
    from _train_fixtures import garble_record, write_dataset

    from alexnet.tools.sample import make_sample
    from alexnet.trainer.config import TrainConfig
    from alexnet.trainer.train import train as fit

    w = tmp_path_factory.mktemp("bad")
    data = write_dataset(w / "data", num_classes=4, train_per_class=2, val_per_class=1)
    write_dataset(w / "data6", num_classes=6, train_per_class=1, val_per_class=1)
    fit(
        TrainConfig.create(
            data_dir=str(data),
            run_dir=str(w / "run"),
            gpus="cpu",
            batch_size=4,
            epochs=0,
            max_steps=1,
            num_threads=1,
            progress=False,
            checkpoint_minutes=0.0,
        )
    )
    make_sample(w / "sample", num_classes=3, train_per_class=20, val_per_class=4)
    ckpt = w / "run" / "checkpoints" / "last.pt"
    (w / "afile").write_text("a regular file\n")
    (w / "notes.pt").write_text("epoch 3 notes\nlr 0.01\n")
    (w / "empty.pt").write_bytes(b"")
    (w / "trunc.pt").write_bytes(ckpt.read_bytes()[: 1 << 20])
    shutil.copyfile(data / "mean_image.npy", w / "other.pt")  # a numpy file
    for name, damage in (("miss", shutil.rmtree), ("corrupt", _scribble)):
        shutil.copytree(data, w / name)
        for split in ("train", "val"):
            damage(sorted((w / name / split).iterdir())[0])
    shutil.copytree(data, w / "badrec")  # every shard valid, one undecodable JPEG in each split
    for split in ("train", "val"):
        garble_record(w / "badrec", split)
    shutil.copytree(w / "run", w / "run-copy")  # to resume on another dataset
    for name in ("notes", "empty", "trunc"):  # runs whose last.pt is not a checkpoint
        (w / f"run-{name}" / "checkpoints").mkdir(parents=True)
        shutil.copyfile(w / "run" / "config.json", w / f"run-{name}" / "config.json")
        shutil.copyfile(w / f"{name}.pt", w / f"run-{name}" / "checkpoints" / "last.pt")
    return w


def _scribble(shard: Path) -> None:
    with (shard / "data.mdb").open("r+b") as f:
        f.write(b"\x17" * 12288)


def _tmpfs(path: Path, size: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs for the full-disk case: {r.stderr.strip() or r.returncode}")


def _full_run(w: Path) -> Path:
    """A run directory on a tmpfs with room for its checkpoint and not for another."""
    ckpt = w / "run" / "checkpoints" / "last.pt"
    mnt = w / "full-run"
    _tmpfs(mnt, ckpt.stat().st_size + (32 << 20))
    (mnt / "checkpoints").mkdir()
    shutil.copyfile(w / "run" / "config.json", mnt / "config.json")
    shutil.copyfile(ckpt, mnt / "checkpoints" / "last.pt")
    return mnt


def _full_data(w: Path) -> Path:
    _tmpfs(w / "full-data", 600 << 10)
    return w / "full-data" / "data"


EVAL = ["eval", "--gpus", "cpu", "--threads", "1", "--batch-size", "4", "--no-progress"]
FIT = ["--gpus", "cpu", "--threads", "1", "--batch-size", "4", "--no-progress", "--max-steps", "2"]
CK = "{run}/checkpoints/last.pt"
PREDICT = ["predict", "--gpus", "cpu", "{afile}"]

# (id, tool, arguments, exit status, piece of the line)
# fmt: off
ROWS = [
    # alexnet-train (fit)
    ("fit-missing-data", train, [*FIT, "--data-dir", "{w}/nodata", "--run-dir", "{w}/r1"], 1, "no dataset at"),
    ("fit-data-is-a-file", train, [*FIT, "--data-dir", "{afile}", "--run-dir", "{w}/r2"], 1, "manifest.json"),
    ("fit-missing-shard", train, [*FIT, "--data-dir", "{miss}", "--run-dir", "{w}/r3"], 1, "is missing"),
    ("fit-damaged-shard", train, [*FIT, "--data-dir", "{corrupt}", "--run-dir", "{w}/r4"], 1, SHARD_FIX),
    ("fit-corrupt-record", train, [*FIT, "--data-dir", "{badrec}", "--run-dir", "{w}/r5"], 1, RECORD_FIX),
    ("fit-run-dir-under-a-file", train, [*FIT, "--data-dir", "{data}", "--run-dir", "{afile}/run"], 1, UNDER_FILE),
    ("resume-last-is-text", train, [*FIT, "--run-dir", "{w}/run-notes", "--resume"], 1, NOT_PT),
    ("resume-last-is-empty", train, [*FIT, "--run-dir", "{w}/run-empty", "--resume"], 1, EMPTY),
    ("resume-last-is-truncated", train, [*FIT, "--run-dir", "{w}/run-trunc", "--resume"], 1, TRUNCATED),
    ("resume-other-class-count", train, [*FIT, "--run-dir", "{w}/run-copy", "--resume", "--data-dir", "{data6}"], 1,
     "was trained on 4 classes, the dataset at"),
    ("resume-full-disk", train, [*FIT, "--run-dir", "{full_run}", "--resume"], 1, FULL),
    # eval
    ("eval-missing-checkpoint", train, [*EVAL, "--data-dir", "{data}", "--checkpoint", "{w}/none.pt"], 1, "no checkpoint at"),
    ("eval-checkpoint-is-a-dir", train, [*EVAL, "--data-dir", "{data}", "--checkpoint", "{run}"], 2, "is a directory"),
    ("eval-text-checkpoint", train, [*EVAL, "--data-dir", "{data}", "--checkpoint", "{notes}"], 1, NOT_PT),
    ("eval-empty-checkpoint", train, [*EVAL, "--data-dir", "{data}", "--checkpoint", "{empty}"], 1, EMPTY),
    ("eval-truncated-checkpoint", train, [*EVAL, "--data-dir", "{data}", "--checkpoint", "{trunc}"], 1, TRUNCATED),
    ("eval-numpy-checkpoint", train, [*EVAL, "--data-dir", "{data}", "--checkpoint", "{other}"], 1, OTHER),
    ("eval-other-class-count", train, [*EVAL, "--data-dir", "{data6}", "--checkpoint", CK], 1,
     "trained on 4 classes, the dataset at"),
    ("eval-no-test-split", train, [*EVAL, "--data-dir", "{data}", "--checkpoint", CK, "--split", "test"], 1,
     "has no test split"),
    ("eval-missing-data", train, [*EVAL, "--data-dir", "{w}/nodata", "--checkpoint", CK], 1, "no dataset at"),
    ("eval-missing-shard", train, [*EVAL, "--data-dir", "{miss}", "--checkpoint", CK], 1, "is missing"),
    ("eval-corrupt-record", train, [*EVAL, "--data-dir", "{badrec}", "--checkpoint", CK], 1, RECORD_FIX),
    ("eval-damaged-shard", train, [*EVAL, "--data-dir", "{corrupt}", "--checkpoint", CK], 1, SHARD_FIX),
    ("eval-run-dir-under-a-file", train, [*EVAL, "--data-dir", "{data}", "--checkpoint", CK, "--run-dir", "{afile}/r"],
     1, UNDER_FILE),
    ("eval-contradicting-mean", train, [*EVAL, "--data-dir", "{data}", "--checkpoint", CK, "--mean", "channel"], 1,
     "trained with --mean image, not channel"),
    ("eval-contradicting-lrn", train, [*EVAL, "--data-dir", "{data}", "--checkpoint", CK, "--lrn", "paper-text"], 1,
     "trained with --lrn authors, not paper-text"),
    ("eval-training-option", train, [*EVAL, "--lr", "5"], 2, "No such option '--lr'"),
    # bench
    ("bench-missing-data", train, ["bench", "--gpus", "cpu", "--data-dir", "{w}/nodata"], 1, "no dataset at"),
    ("bench-damaged-shard", train, ["bench", "--gpus", "cpu", "--steps", "1", "--batch-size", "4", "--data-dir",
                                    "{corrupt}"], 1, SHARD_FIX),
    # predict
    ("predict-missing-checkpoint", train, [*PREDICT, "--checkpoint", "{w}/none.pt"], 1, "no checkpoint at"),
    ("predict-text-checkpoint", train, [*PREDICT, "--checkpoint", "{notes}"], 1, NOT_PT),
    ("predict-empty-checkpoint", train, [*PREDICT, "--checkpoint", "{empty}"], 1, EMPTY),
    ("predict-truncated-checkpoint", train, [*PREDICT, "--checkpoint", "{trunc}"], 1, TRUNCATED),
    ("predict-numpy-checkpoint", train, [*PREDICT, "--checkpoint", "{other}"], 1, OTHER),
    ("predict-no-images", train, ["predict", "--gpus", "cpu", "--checkpoint", CK, "{data}/train"],
     1, "no image files among the inputs"),
    # export
    ("export-text-checkpoint", train, ["export", "--checkpoint", "{notes}", "--out", "{w}/x.pt2"], 1, NOT_PT),
    ("export-out-under-a-file", train, ["export", "--checkpoint", CK, "--out", "{afile}/x.pt2"], 1, "a file is in the way"),
    # report
    ("report-missing-run", train, ["report", "{w}/norun"], 1, "run directory"),
    ("report-text-checkpoint", train, ["report", "{run}", "--checkpoint", "{notes}", "--out", "{w}/rep1"], 1, NOT_PT),
    ("report-out-under-a-file", train, ["report", "{run}", "--out", "{afile}/rep"], 1, UNDER_FILE),
    # alexnet-prep
    ("make-sample-in-proc", prep, ["make-sample", "/proc/foo"], 1, "choose a directory you can write"),
    ("make-sample-under-a-file", prep, ["make-sample", "{afile}/s"], 1, "choose a directory you can write"),
    ("build-lmdb-missing-source", prep, ["build-lmdb", "{w}/nosrc", "--data-dir", "{w}/d1"], 2, "does not exist"),
    ("build-lmdb-source-is-a-file", prep, ["build-lmdb", "{afile}", "--data-dir", "{w}/d2"], 1, "is not one of ImageNet's archives"),
    ("build-lmdb-data-dir-under-a-file", prep, ["build-lmdb", "{w}/sample", "--data-dir", "{afile}/d", "--workers", "1"],
     1, UNDER_FILE),
    ("build-lmdb-full-disk", prep, ["build-lmdb", "{w}/sample", "--data-dir", "{full_data}", "--workers", "1"], 1,
     "a full disk? free space and run the same command again"),
    ("verify-missing-data", prep, ["verify", "--data-dir", "{w}/nodata"], 1, "no dataset at"),
    ("verify-missing-shard", prep, ["verify", "--data-dir", "{miss}"], 1, "rebuild with"),
    ("verify-damaged-shard", prep, ["verify", "--data-dir", "{corrupt}"], 1, SHARD_FIX),
    ("pca-stats-missing-shard", prep, ["pca-stats", "--data-dir", "{miss}"], 1, "missing"),
    ("pca-stats-damaged-shard", prep, ["pca-stats", "--data-dir", "{corrupt}"], 1, SHARD_FIX),
    ("preview-damaged-shard", prep, ["preview", "--data-dir", "{corrupt}", "--n", "4", "--out", "{w}/p.npz"], 1,
     SHARD_FIX),
]
# fmt: on


@pytest.mark.parametrize("tool, args, status, message", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_is_one_line_and_a_non_zero_exit(world, tool, args, status, message, monkeypatch, request):
    w = world
    monkeypatch.chdir(w)
    paths = {
        "w": w,
        "data": w / "data",
        "data6": w / "data6",
        "run": w / "run",
        "afile": w / "afile",
        "miss": w / "miss",
        "corrupt": w / "corrupt",
        "badrec": w / "badrec",
        **{n: w / f"{n}.pt" for n in ("notes", "empty", "trunc", "other")},
    }
    text = " ".join(args)
    if "{full_run}" in text:
        paths["full_run"] = _full_run(w)
    if "{full_data}" in text:
        paths["full_data"] = _full_data(w)
    try:
        r = CliRunner().invoke(tool, [a.format(**paths) for a in args])
        output = r.output.strip()
        assert r.exit_code == status, output
        assert "Traceback" not in output and r.exc_info[0] is SystemExit, output
        errors = [line for line in output.splitlines() if line.startswith(("error:", "Error:"))]
        assert len(errors) == 1 and message in errors[0], output
        print(f"{request.node.callspec.id}: {errors[0]}")  # the table of the closing note (pytest -s)
        if status == 1:
            assert output.splitlines()[-1] == errors[0], output  # the last word is the error
        if "full_run" in paths:  # nothing already written is lost
            ckpt_io.load_checkpoint(paths["full_run"] / "checkpoints" / "last.pt")
            assert not list((paths["full_run"] / "checkpoints").glob(".*tmp")), "a half-written file was left"
    finally:
        for name in ("full_run", "full_data"):
            if name in paths:
                subprocess.run(["umount", str(w / name.replace("_", "-"))], check=False)
