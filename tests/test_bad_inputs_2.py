"""The second table of bad inputs (issue 29): what a long real run meets besides one bad file at a time.

Checkpoints of another program, data and checkpoints of a newer version, invalid numbers, a GPU that is
not there, users' own images, a manifest that no longer matches its shards, and commands that meet
each other (two builds, two trainers, an overwrite under a reader, a lock holder killed with kill -9).

Each row: the command line (``{name}`` fills in a path of the world below), the exit status and a piece
of the one line it must print; an optional ``meet`` names another command started first as a real
process (``MEETINGS``: it holds its lock, frozen with SIGSTOP while the row runs, then finishes, and
what it wrote is checked). Rows of status 0 print no error line.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from alexnet.pipeline import artifacts as A
from alexnet.pipeline import locks
from alexnet.tools.cli import main as prep
from alexnet.trainer import checkpoint as ckpt_io
from alexnet.trainer.cli import main as train

BIN = Path(sys.executable).parent
FOREIGN = "is not an alexnet-train checkpoint (a bare state dict of"
NEWER_DATA = f"was written by a newer alexnet (schema version {A.SCHEMA_VERSION + 1}; this one reads {A.SCHEMA_VERSION}): upgrade"
NEWER_CKPT = "was written by a newer alexnet-train (checkpoint format 4"
IN_USE = "is in use by"


def _torchvision_state_dict() -> dict[str, torch.Tensor]:
    """What ``torch.save(torchvision.models.alexnet().state_dict(), f)`` writes: its keys and shapes, small."""
    shapes = {"features.0": (64, 3, 11, 11), "features.3": (192, 64, 5, 5), "classifier.6": (1000, 4096)}
    out = {}
    for name, shape in shapes.items():
        out[f"{name}.weight"] = torch.zeros(shape[:2])  # shapes cut down: only the keys matter here
        out[f"{name}.bias"] = torch.zeros(shape[0])
    return out


def _newer(path: Path, key: str, value: int) -> None:
    d = json.loads(path.read_text())
    d[key] = value
    path.write_text(json.dumps(d))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A dataset, a run trained one step on it, the sample tree, and the bad things built from them."""
    from _train_fixtures import write_dataset
    from PIL import Image

    from alexnet.tools.sample import make_sample
    from alexnet.trainer.config import TrainConfig
    from alexnet.trainer.train import train as fit

    w = tmp_path_factory.mktemp("bad2")
    data = write_dataset(w / "data", num_classes=4, train_per_class=2, val_per_class=1)
    cfg = dict(gpus="cpu", batch_size=4, epochs=0, max_steps=1, num_threads=1, progress=False, checkpoint_minutes=0.0)
    fit(TrainConfig.create(data_dir=str(data), run_dir=str(w / "run"), **cfg))
    make_sample(w / "sample", num_classes=3, train_per_class=20, val_per_class=4)
    ckpt = w / "run" / "checkpoints" / "last.pt"
    torch.save(_torchvision_state_dict(), w / "tv.pt")
    raw = ckpt_io.read_checkpoint_file(ckpt)
    torch.save({**raw, "format_version": ckpt_io.FORMAT_VERSION + 1}, w / "newer.pt")
    for name, pt in (("run-tv", "tv.pt"), ("run-newer", "newer.pt")):
        shutil.copytree(w / "run", w / name)
        shutil.copyfile(w / pt, w / name / "checkpoints" / "last.pt")
    shutil.copytree(data, w / "data-newer")
    _newer(w / "data-newer" / A.MANIFEST_FILE, "schema_version", A.SCHEMA_VERSION + 1)
    shutil.copytree(data, w / "data-count")  # the manifest says one record more than shard 0 holds
    m = json.loads((w / "data-count" / A.MANIFEST_FILE).read_text())
    m["splits"]["train"]["shards"][0]["num_records"] += 1
    m["splits"]["train"]["num_records"] += 1
    (w / "data-count" / A.MANIFEST_FILE).write_text(json.dumps(m))
    Image.new("RGB", (40, 30), (200, 30, 30)).save(w / "good.png")
    shutil.copyfile(next((w / "sample").rglob("*.JPEG")), w / "photo.jpg")
    (w / "trunc.jpg").write_bytes((w / "photo.jpg").read_bytes()[:300])
    (w / "empty.jpg").write_bytes(b"")
    from test_predict import _png_bomb

    _png_bomb(w / "bomb.png")
    return w


# ------------------------------------------------------------------ commands met: real processes


def _wait_for_record(directory: Path, pid: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Until ``pid``'s lock record is in ``directory``'s lock file (the holder has its lock)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r.get("pid") == pid for r in locks.holders(directory)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the first command ended ({proc.returncode}) before its lock was seen")
        time.sleep(0.01)
    raise AssertionError(f"no lock record of pid {pid} in {directory}")


def _start(args: list[str], holds: Path, freeze: bool = True) -> subprocess.Popen:
    """A real command (own process group) that has written its lock record into ``holds``; frozen."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    _wait_for_record(holds, p.pid, p)
    if freeze:
        os.kill(p.pid, signal.SIGSTOP)  # the main process only (its workers wait for it)
    return p


def _finish(p: subprocess.Popen) -> str:
    os.kill(p.pid, signal.SIGCONT)
    try:
        out, _ = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        ps = subprocess.run(["ps", "-o", "pid,stat,wchan:32,args", "-g", str(p.pid)], capture_output=True, text=True)
        os.killpg(p.pid, signal.SIGKILL)
        raise AssertionError(f"the first command did not finish:\n{ps.stdout}") from None
    assert p.returncode == 0, out[-3000:]
    return out


TRAIN_CPU = ["--gpus", "cpu", "--threads", "1", "--batch-size", "4", "--no-progress"]


@contextlib.contextmanager
def _build_running(w: Path):
    """A build into cc-build holds it; after the refused second build it finishes, complete."""
    build = [str(BIN / "alexnet-prep"), "build-lmdb", str(w / "sample"), "--data-dir", str(w / "cc-build")]
    p = _start([*build, "--workers", "1", "--no-progress"], w / "cc-build")
    yield
    _finish(p)
    assert A.read_manifest(w / "cc-build").complete


@contextlib.contextmanager
def _trainer_running(w: Path):
    """A trainer holds cc-run (and reads data); after the refused second trainer it ends at step 2."""
    shutil.rmtree(w / "cc-run", ignore_errors=True)
    dirs = ["--data-dir", str(w / "data"), "--run-dir", str(w / "cc-run")]
    p = _start(
        [str(BIN / "alexnet-train"), *TRAIN_CPU, *dirs, "--max-steps", "2", "--checkpoint-minutes", "0"], w / "cc-run"
    )
    yield
    _finish(p)
    assert ckpt_io.load_checkpoint(w / "cc-run" / "checkpoints" / "last.pt")["step"] == 2


@contextlib.contextmanager
def _reader_running(w: Path):
    """A trainer reads cc-data; the refused overwrite changes nothing, and the trainer ends."""
    if not (w / "cc-data").exists():
        shutil.copytree(w / "data", w / "cc-data")
    before = (w / "cc-data" / A.MANIFEST_FILE).read_bytes()
    shutil.rmtree(w / "cc-reader", ignore_errors=True)
    dirs = ["--data-dir", str(w / "cc-data"), "--run-dir", str(w / "cc-reader")]
    p = _start([str(BIN / "alexnet-train"), *TRAIN_CPU, *dirs, "--max-steps", "2"], w / "cc-data")
    yield
    _finish(p)
    assert (w / "cc-data" / A.MANIFEST_FILE).read_bytes() == before


@contextlib.contextmanager
def _holder_killed(w: Path):
    """A build into cc-kill is killed with SIGKILL (it and its workers) once it holds the lock."""
    build = [str(BIN / "alexnet-prep"), "build-lmdb", str(w / "sample"), "--data-dir", str(w / "cc-kill")]
    p = _start([*build, "--workers", "1", "--no-progress"], w / "cc-kill", freeze=False)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    yield
    assert A.read_manifest(w / "cc-kill").complete  # the new command got the lock and finished the build


MEETINGS = {"build": _build_running, "trainer": _trainer_running, "reader": _reader_running, "kill9": _holder_killed}

EVAL = ["eval", "--gpus", "cpu", "--threads", "1", "--batch-size", "4", "--no-progress", "--data-dir", "{data}"]
FIT = [*TRAIN_CPU, "--max-steps", "2"]
CK = "{w}/run/checkpoints/last.pt"
PREDICT = ["predict", "--gpus", "cpu", "--checkpoint", CK, "{w}/good.png"]
WORLD4 = {"WORLD_SIZE": "4", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4"}
WORLD4 |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}

# (id, tool, arguments, exit status, piece of the line, meet, environment)
# fmt: off
ROWS = [
    # a checkpoint written by another program (torchvision's state_dict)
    ("eval-foreign-checkpoint", train, [*EVAL, "--checkpoint", "{w}/tv.pt"], 1, FOREIGN, None, None),
    ("predict-foreign-checkpoint", train, ["predict", "--gpus", "cpu", "--checkpoint", "{w}/tv.pt", "{w}/good.png"], 1,
     FOREIGN, None, None),
    ("export-foreign-checkpoint", train, ["export", "--checkpoint", "{w}/tv.pt", "--out", "{w}/x.pt2"], 1, FOREIGN,
     None, None),
    ("resume-foreign-checkpoint", train, [*FIT, "--run-dir", "{w}/run-tv", "--resume"], 1, FOREIGN, None, None),
    # newer versions
    ("fit-newer-dataset", train, [*FIT, "--data-dir", "{w}/data-newer", "--run-dir", "{w}/r1"], 1, NEWER_DATA, None, None),
    ("verify-newer-dataset", prep, ["verify", "--data-dir", "{w}/data-newer"], 1, NEWER_DATA, None, None),
    ("resume-newer-run", train, [*FIT, "--run-dir", "{w}/run-newer", "--resume"], 1, NEWER_CKPT, None, None),
    ("eval-newer-checkpoint", train, [*EVAL, "--checkpoint", "{w}/newer.pt"], 1, NEWER_CKPT, None, None),
    # invalid numbers (0 epochs or steps keep their meaning, no limit)
    ("fit-batch-not-divisible", train, [*TRAIN_CPU[:4], "--batch-size", "6", "--data-dir", "{data}", "--run-dir",
                                        "{w}/r2"], 1, "must divide evenly over 4 replicas", None, WORLD4),
    ("fit-negative-lr", train, [*FIT, "--lr", "-0.01"], 2, "Invalid value for '--lr'", None, None),
    ("fit-negative-decay", train, [*FIT, "--weight-decay", "-1"], 2, "Invalid value for '--weight-decay'", None, None),
    ("fit-momentum-one", train, [*FIT, "--momentum", "1"], 2, "Invalid value for '--momentum': 1.0 is not in the range 0<=x<1",
     None, None),
    ("fit-negative-momentum", train, [*FIT, "--momentum", "-0.5"], 2, "Invalid value for '--momentum'", None, None),
    ("fit-negative-keep-epochs", train, [*FIT, "--keep-epochs", "-1"], 2, "Invalid value for '--keep-epochs'", None,
     None),
    ("verify-negative-sample", prep, ["verify", "--data-dir", "{data}", "--sample", "-1"], 2,
     "Invalid value for '--sample'", None, None),
    ("pca-stats-negative-sample", prep, ["pca-stats", "--data-dir", "{data}", "--sample", "-5"], 2,
     "Invalid value for '--sample'", None, None),
    # a GPU that is not there
    ("fit-missing-gpu", train, [*FIT[2:], "--gpus", "3", "--data-dir", "{data}", "--run-dir", "{w}/r3"], 1,
     "--gpus '3': GPU 3 not available", None, None),
    ("eval-missing-gpu", train, ["eval", "--gpus", "3", "--data-dir", "{data}", "--checkpoint", CK], 1,
     "GPU 3 not available", None, None),
    ("predict-missing-gpu", train, ["predict", "--gpus", "3", "--checkpoint", CK, "{w}/good.png"], 1,
     "GPU 3 not available", None, None),
    # users' images: one line naming the file, the others still predicted, status 1
    ("predict-truncated-image", train, [*PREDICT, "{w}/trunc.jpg"], 1, "trunc.jpg: error: truncated", None, None),
    ("predict-empty-image", train, [*PREDICT, "{w}/empty.jpg"], 1, "empty.jpg: error: zero-byte file", None, None),
    ("predict-decompression-bomb", train, [*PREDICT, "{w}/bomb.png"], 1, "bomb.png: error: too large", None, None),
    # a manifest that no longer matches its shards
    ("verify-manifest-counts", prep, ["verify", "--data-dir", "{w}/data-count"], 1, "problems in", None, None),
    ("fit-manifest-counts", train, [*FIT, "--data-dir", "{w}/data-count", "--run-dir", "{w}/r4"], 1,
     "but the manifest says", None, None),
    # commands that meet
    ("two-builds-one-data-dir", prep, ["build-lmdb", "{w}/sample", "--data-dir", "{w}/cc-build", "--workers", "1",
                                       "--no-progress"], 1, f"{IN_USE} alexnet-prep build-lmdb (pid", "build", None),
    ("two-trainers-one-run-dir", train, [*FIT, "--data-dir", "{data}", "--run-dir", "{w}/cc-run", "--resume"], 1,
     f"{IN_USE} alexnet-train (training) (pid", "trainer", None),
    ("overwrite-under-a-reader", prep, ["build-lmdb", "{w}/sample", "--data-dir", "{w}/cc-data", "--overwrite",
                                        "--workers", "1", "--no-progress"], 1, f"{IN_USE} alexnet-train (reading) (pid",
     "reader", None),
    ("after-kill-9-of-the-holder", prep, ["build-lmdb", "{w}/sample", "--data-dir", "{w}/cc-kill", "--workers", "1",
                                          "--no-progress"], 0, "", "kill9", None),
]
# fmt: on


@pytest.mark.parametrize("tool, args, status, message, meet, env", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_second_bad_input_is_one_line_and_a_non_zero_exit(world, tool, args, status, message, meet, env, request):
    w = world
    paths = {"w": w, "data": w / "data"}
    with MEETINGS[meet](w) if meet else contextlib.nullcontext():
        r = CliRunner().invoke(tool, [a.format(**paths) for a in args], env=env)
    output = r.output.strip()
    assert r.exit_code == status, output
    assert "Traceback" not in output and r.exc_info[0] is SystemExit, output
    errors = [line for line in output.splitlines() if line.startswith(("error:", "Error:")) or ": error: " in line]
    if status == 0:
        assert errors == [], output
        print(f"{request.node.callspec.id}: (status 0) {output.splitlines()[-1]}")
        return
    assert len(errors) == 1 and message in errors[0], output
    print(f"{request.node.callspec.id}: {errors[0]}")  # the table of the closing note (pytest -s)
    if status == 1:
        assert output.splitlines()[-1] == errors[0], output  # the last word is the error
