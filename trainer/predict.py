"""The trained network on users' own photos: ``alexnet-train predict`` and the pieces ``export`` reuses.

Preprocessing is the paper's (§2, §4.1): decode to RGB, shorter side 256 and the central 256x256
patch (the builder's own resize, without its JPEG re-encoding), subtract the dataset's mean image,
then the central 224x224 patch, or with ``ten_crop`` the ten patches of the evaluation (four
corners and centre, each mirrored) whose softmax outputs are averaged.

What a checkpoint needs besides its weights (class list, names, mean image) comes from the checkpoint
itself (its ``dataset`` entry, :func:`checkpoint.dataset_entry`): no dataset is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from alexnet.pipeline import constants as C
from alexnet.pipeline.dali_pipeline import MAX_OFFSET, TEN_CROP_POSITIONS
from alexnet.pipeline.errors import AlexnetError
from alexnet.pipeline.images import IMAGE_SUFFIXES, Rejected, decode_image, resize_centre_crop

from . import checkpoint as ckpt_io
from .evaluate import average_patch_softmax
from .model import AlexNet

# Top-left corners of the five patches, in the evaluation pipeline's order (then each mirrored).
PATCH_CORNERS = tuple((round(px * MAX_OFFSET), round(py * MAX_OFFSET)) for px, py in TEN_CROP_POSITIONS)


@dataclass
class Predictor:
    model: AlexNet
    classes: list[str]
    names: list[str]
    mean_image: np.ndarray  # (256, 256, 3) float32, RGB, 0-255

    def name(self, i: int) -> str:
        return self.names[i] if self.names else self.classes[i]


def load_predictor(checkpoint: Path, device: torch.device) -> Predictor:
    """The checkpoint's network in eval mode with its classes and mean image; one line on a mismatch."""
    ck = ckpt_io.load_checkpoint(checkpoint)
    model = AlexNet.from_checkpoint(ck, devices=device).eval()
    entry = ck.get("dataset")
    if not entry:
        raise AlexnetError(
            f"{checkpoint} carries no class list or mean image (its 'dataset' entry): give a checkpoint "
            "written by alexnet-train's training"
        )
    classes, names = list(entry["classes"]), list(entry.get("class_names") or [])
    if len(classes) != model.num_classes:
        raise AlexnetError(f"{checkpoint} has {model.num_classes} output classes but its class list has {len(classes)}")
    mean = entry["mean_image"]
    mean = mean.numpy() if isinstance(mean, torch.Tensor) else np.asarray(mean, dtype=np.float32)
    return Predictor(model, classes, names, mean)


def stored_crop(path: Path) -> np.ndarray:
    """§2: an image file as the dataset stores it, (256, 256, 3) float32 RGB. Raises AlexnetError."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise AlexnetError(f"cannot read: {e.strerror or e}") from None
    try:
        image = resize_centre_crop(decode_image(data))
    except Rejected as e:
        raise AlexnetError(str(e)) from None
    return np.asarray(image, dtype=np.float32)


def patches(image: np.ndarray, mean_image: np.ndarray, ten_crop: bool) -> np.ndarray:
    """(P, 3, 224, 224) float32, mean subtracted: the centre patch, or the ten patches of §4.1."""
    centred = image - mean_image
    corners = PATCH_CORNERS if ten_crop else PATCH_CORNERS[-1:]
    cuts = [centred[y : y + C.CROP_SIZE, x : x + C.CROP_SIZE] for x, y in corners]
    if ten_crop:
        cuts += [cut[:, ::-1] for cut in cuts]
    return np.stack(cuts).transpose(0, 3, 1, 2).copy()


@torch.no_grad()
def probabilities(model: AlexNet, batch: np.ndarray, per_image: int) -> torch.Tensor:
    """Softmax outputs [B, K] of a batch of patches [B * per_image, 3, 224, 224], averaged per image."""
    logits = model(torch.from_numpy(batch))
    return average_patch_softmax(logits, per_image).cpu()


def image_files(inputs: list[Path]) -> list[Path]:
    """Files given, and the image files under directories given (sorted, recursive)."""
    out: list[Path] = []
    for p in inputs:
        if Path(p).is_dir():
            out += sorted(f for f in Path(p).rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(Path(p))
    return out


def load_predictors(checkpoints: list[Path], device: torch.device) -> list[Predictor]:
    """Several checkpoints for §6's average, each with its own mean and LRN form; their classes must agree."""
    preds = [load_predictor(Path(c), device) for c in checkpoints]
    for path, p in zip(checkpoints[1:], preds[1:], strict=True):
        if p.classes != preds[0].classes:
            raise AlexnetError(
                f"{path} was trained on other classes than {checkpoints[0]} ({len(p.classes)} vs "
                f"{len(preds[0].classes)}): average checkpoints of the same dataset"
            )
    return preds


def average_probabilities(preds: list[Predictor], images: list[np.ndarray], ten_crop: bool) -> torch.Tensor:
    """§6: the mean over the models of each one's softmax output [B, K] for stored crops ``images``, every
    model on its own mean image (and the ten patches' mean with ``ten_crop``)."""
    per_image = C.TEN_CROP if ten_crop else 1
    total = None
    for p in preds:
        batch = np.concatenate([patches(image, p.mean_image, ten_crop) for image in images])
        probs = probabilities(p.model, batch, per_image)
        total = probs if total is None else total + probs
    return total / len(preds)


def predict(pred: Predictor | list[Predictor], files: list[Path], *, ten_crop: bool, batch_size: int, progress=None):
    """Yield one dict per file, in order: ``{"path", "top5": [{"wnid", "name", "prob"}]}`` or ``{"path", "error"}``.
    With several predictors the probabilities are their average (:func:`average_probabilities`)."""
    preds = pred if isinstance(pred, list) else [pred]
    first = preds[0]
    k = min(5, len(first.classes))
    for start in range(0, len(files), batch_size):
        chunk, ready, results = files[start : start + batch_size], [], {}
        for path in chunk:
            try:
                ready.append((path, stored_crop(path)))
            except AlexnetError as e:
                results[path] = {"path": str(path), "error": str(e)}
        if ready:
            top = average_probabilities(preds, [image for _, image in ready], ten_crop).topk(k, dim=1)
            for (path, _), values, indices in zip(ready, top.values, top.indices, strict=True):
                results[path] = {
                    "path": str(path),
                    "top5": [
                        {"wnid": first.classes[i], "name": first.name(i), "prob": round(float(v), 6)}
                        for v, i in zip(values.tolist(), indices.tolist(), strict=True)
                    ],
                }
        for path in chunk:
            if progress is not None:
                progress.update(1)
            yield results[path]
