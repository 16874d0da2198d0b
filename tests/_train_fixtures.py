"""Tiny datasets for the trainer tests, written through the data contract (artifacts).

Records are 256x256 JPEGs in Caffe Datums, keyed and sharded as a builder writes them, with a
mean image and RGB PCA stats, so the real pipeline (DALI, CPU-only mode) reads them.
``unique_labels=True`` gives every training record its own class (label = source index), so a test
can tell from the labels alone which records a replica saw.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from _writers import stats_of_images, write_split

from alexnet.pipeline import artifacts as A
from alexnet.pipeline import constants as C


def _jpeg(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _image(rng: np.random.Generator, label: int, num_classes: int) -> np.ndarray:
    """A class-coloured square on a noisy grey background: learnable in a few CPU steps."""
    size = C.STORED_SIZE
    img = rng.normal(128, 20, (size, size, 3))
    hue = np.array([np.cos(2 * np.pi * label / num_classes), np.sin(2 * np.pi * label / num_classes), 0.0])
    colour = 128 + 100 * np.array([hue[0], hue[1], -hue[0] * 0.5])
    y, x = rng.integers(16, size - 144, 2)
    img[y : y + 128, x : x + 128] = colour + rng.normal(0, 10, (128, 128, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _write_split(data_dir: Path, split: str, images: list[np.ndarray], labels: list[int], num_shards: int, seed: int):
    records = [
        (f"c{lab}/img{src}.JPEG", _jpeg(img), lab) for src, (img, lab) in enumerate(zip(images, labels, strict=True))
    ]
    info = write_split(data_dir, split, records, num_shards, seed, map_size=1 << 28)
    info.layout = "test"
    return info


def write_dataset(
    data_dir: Path,
    *,
    num_classes: int = 4,
    train_per_class: int = 8,
    val_per_class: int = 2,
    unique_labels: bool = False,
    num_shards: int = 2,
    seed: int = 0,
) -> Path:
    """Write a dataset directory (manifest, stats, mean image, train and val shards); returns it."""
    data_dir = Path(data_dir)
    if (data_dir / A.MANIFEST_FILE).exists():
        return data_dir
    rng = np.random.default_rng(seed)
    if unique_labels:
        n_train = num_classes * train_per_class
        train_labels = list(range(n_train))
        num_classes = n_train
    else:
        train_labels = [c for c in range(num_classes) for _ in range(train_per_class)]
    val_labels = [c for c in range(num_classes) for _ in range(val_per_class)]
    train = [_image(rng, lab, num_classes) for lab in train_labels]
    val = [_image(rng, lab, num_classes) for lab in val_labels]
    splits = {
        "train": _write_split(data_dir, "train", train, train_labels, num_shards, seed),
        "val": _write_split(data_dir, "val", val, val_labels, 1, seed + 1),
    }
    classes = [f"n{10000000 + i:08d}" for i in range(num_classes)]
    # Stats of the training images, computed by pca-stats' accumulator (tested against numpy there).
    A.write_stats(data_dir, *stats_of_images(np.stack(train), {"split": "train", "test": True}))
    A.write_manifest(data_dir, A.Manifest(classes=classes, splits=splits, build={"test": True}))
    return data_dir


def garble_record(data_dir: Path, split: str, shard: int = 0, index: int = 0) -> str:
    """Garbage in place of the JPEG of one record (the ``index``-th of the split's ``shard``-th shard),
    written through LMDB: a valid shard holding an undecodable record. Returns its key."""
    env = A.open_shard(A.read_manifest(data_dir).shard_paths(data_dir, split)[shard], readonly=False, map_size=1 << 26)
    with env.begin(write=True) as txn:
        key, value = list(txn.cursor())[index]
        txn.put(
            key, A.Datum(data=b"not a jpeg" * 50, label=A.Datum.decode(value).label, height=256, width=256).encode()
        )
    env.close()
    return key.decode()


def train_watched(config, on_step=None):
    """``alexnet.trainer.train.train(config)`` with ``on_step(step, epoch, labels)`` called after every
    optimiser step (it may raise to stop the run like a crash, or signal the process); returns
    (summary, this process's trained network). The production trainer has no such hook: a subclass
    takes the real Trainer's place for the duration of the call."""
    from alexnet.trainer import train as T

    real = T.Trainer
    made = []

    class Watched(real):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            made.append(self)
            step = self.step_fn
            self.step_fn = lambda images, labels: step(images, self._keep(labels))

        def _keep(self, labels):
            self.labels = labels
            return labels

        def after_step(self):
            if on_step is not None:
                on_step(self.state.step, self.state.epoch, self.labels)
            return super().after_step()

    T.Trainer = Watched
    try:
        summary = T.train(config)
    finally:
        T.Trainer = real
    return summary, made[-1].model


# --------------------------------------------------------------------------- real runs (DALI CPU-only, LMDB)

RUN_KW = dict(
    gpus="cpu",
    batch_size=4,
    epochs=0,
    lr=1e-3,
    log_every_steps=1,
    num_threads=1,
    progress=False,
    checkpoint_minutes=0.0,
)
STEPS = 6  # 4 steps per epoch (16 records / 4): crosses an epoch end and an evaluation
KILL_AT = 4  # after the step-3 checkpoint, mid-epoch (before epoch 1's end)


def run_config(data, run_dir, **kw):
    """A short CPU run of ``STEPS`` steps on ``data`` (the ``train_data`` fixture) into ``run_dir``."""
    from alexnet.trainer.config import TrainConfig

    return TrainConfig.create(data_dir=str(data), run_dir=str(run_dir), **{**RUN_KW, "max_steps": STEPS, **kw})


def metrics_lines(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def train_recording(monkeypatch, poison_at: int | None = None):
    """``train`` with the test's own synchronous reads: each step's loss (``.item()``) and, before
    each log point, the layers' norms, beside the count of the trainer's host reads (HostCopy.read) and
    of the train lines in metrics.jsonl. ``poison_at``: a NaN put into a conv1 weight after that step."""
    import torch

    from alexnet.trainer import health
    from alexnet.trainer import train as T
    from alexnet.trainer.model import LEARNED_LAYERS

    rec: dict = {"losses": {}, "norms": {}, "reads": 0, "seen": []}
    real_read = health.HostCopy.read

    def read(self):
        rec["reads"] += 1
        return real_read(self)

    class Recording(T.Trainer):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            step = self.step_fn

            def recorded(images, labels):
                loss = step(images, labels)
                rec["losses"][self.state.step + 1] = loss.item()
                return loss

            self.step_fn = recorded

        def after_step(self):
            lines = (self.run_dir / "metrics.jsonl").read_text().count('"kind": "train"')
            rec["seen"].append((rec["reads"], lines))
            if self.state.step == poison_at:
                with torch.no_grad():
                    next(self.model.conv1.parameters()).view(-1)[0] = float("nan")
            rec["norms"][self.state.step] = health.layer_norms(self.model, LEARNED_LAYERS)
            return super().after_step()

    monkeypatch.setattr(health.HostCopy, "read", read)
    monkeypatch.setattr(T, "Trainer", Recording)
    return T.train, rec


def train_tiny(data: Path, run_dir: Path, **overrides) -> Path:
    """``run_config``'s run cut to 3 steps (``overrides``: other TrainConfig values); returns its last
    checkpoint, which carries the classes and the mean."""
    from alexnet.trainer.train import train

    train(run_config(data, run_dir, **{"max_steps": 3, **overrides}))
    return Path(run_dir) / "checkpoints" / "last.pt"


def trained_run(base: Path, *, val_per_class: int = 2) -> tuple[Path, Path]:
    """``(dataset, checkpoint)``: a 4-class dataset under ``base`` and ``train_tiny``'s run on it."""
    data = write_dataset(base / "data", num_classes=4, train_per_class=4, val_per_class=val_per_class)
    return data, train_tiny(data, base / "run")
