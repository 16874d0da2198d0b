"""Figure 4 of the paper (§6.1), drawn for a run: predictions and nearest neighbours in fc7 space.

``figure4_predictions.png``: validation images with their true label and the network's top-5 as bars
(the true class's in orange). ``figure4_neighbours.png``: query validation images, each followed by
the six training images nearest in fc7 (after its ReLU, Euclidean), searched among the first
``train_limit`` training records (key order is a seeded shuffle, so a random sample). Also a per-class
error table (centre crop, first ``val_limit`` validation records). Records are decoded with PIL and
cut as evaluation does (mean image subtracted, centre 224 patch); the network runs on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from alexnet.pipeline import artifacts as A
from alexnet.pipeline.images import decode_record

from .plots import BACKGROUND, INK, PALETTE, font
from .predict import Predictor, patches

TOP = 5
NEIGHBOURS = 6
THUMB = 112  # pixels per image in the figures


@dataclass
class Pass:
    """One split's sample through the network: stored 256x256 images, labels, softmax and fc7."""

    images: np.ndarray  # (N, 256, 256, 3) uint8
    labels: np.ndarray  # (N,)
    probs: torch.Tensor  # (N, classes)
    fc7: torch.Tensor  # (N, 4096)


def run_split(pred: Predictor, data_dir: Path, split: str, limit: int, batch: int = 64) -> Pass:
    """The first ``limit`` records of ``split`` through the network (centre crop)."""
    images, labels = [], []
    for _key, datum in A.iter_records(data_dir, split):
        images.append(decode_record(datum.data))  # the one decoder of stored records
        labels.append(datum.label)
        if len(images) >= limit:
            break
    seen: list[torch.Tensor] = []
    hook = pred.model.fc7.register_forward_hook(lambda _m, _i, out: seen.append(torch.relu(torch.cat(out, 1))))
    probs = []
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch):
                cuts = [patches(im.astype(np.float32), pred.mean_image, False) for im in images[start : start + batch]]
                probs.append(torch.softmax(pred.model(torch.from_numpy(np.concatenate(cuts))), 1).cpu())
    finally:
        hook.remove()
    return Pass(np.stack(images), np.asarray(labels), torch.cat(probs), torch.cat(seen).cpu())


def nearest(queries: torch.Tensor, pool: torch.Tensor, k: int = NEIGHBOURS) -> torch.Tensor:
    """Indices [Q, k] of the ``k`` rows of ``pool`` nearest to each query (Euclidean), nearest first."""
    d = torch.cdist(queries.double(), pool.double())
    return d.topk(min(k, pool.shape[0]), dim=1, largest=False).indices


def class_errors(p: Pass, pred: Predictor) -> list[tuple[str, str, int, float]]:
    """(wnid, name, images, top-1 error) per class present in the sample, worst first."""
    wrong = (p.probs.argmax(1).numpy() != p.labels).astype(float)
    rows = []
    for c in np.unique(p.labels):
        mask = p.labels == c
        rows.append((pred.classes[c], pred.name(int(c)), int(mask.sum()), float(wrong[mask].mean())))
    return sorted(rows, key=lambda r: (-r[3], r[0]))


def _thumb(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image).resize((THUMB, THUMB), Image.Resampling.BILINEAR)


def _short(text: str, n: int = 22) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def predictions_panel(p: Pass, pred: Predictor, n: int = 8) -> Image.Image:
    """Left panel: n images, true label under each, top-5 bars beside it; two columns of cards."""
    card_w, card_h, cols = THUMB + 250, THUMB + 34, 2
    rows = -(-min(n, len(p.labels)) // cols)
    img = Image.new("RGB", (cols * card_w + 16, rows * card_h + 40), BACKGROUND)
    draw = ImageDraw.Draw(img)
    draw.text((8, 8), "Figure 4 (left): validation images, true label, top-5", fill=INK, font=font(15))
    for i in range(min(n, len(p.labels))):
        x, y = 8 + (i % cols) * card_w, 36 + (i // cols) * card_h
        img.paste(_thumb(p.images[i]), (x, y))
        truth = int(p.labels[i])
        draw.text((x, y + THUMB + 4), _short(pred.name(truth), 20), fill=INK, font=font(12))
        values, indices = p.probs[i].topk(min(TOP, p.probs.shape[1]))
        for r, (v, c) in enumerate(zip(values.tolist(), indices.tolist(), strict=True)):
            by = y + 4 + r * 21
            colour = PALETTE[1] if c == truth else PALETTE[0]
            draw.rectangle((x + THUMB + 8, by, x + THUMB + 8 + int(110 * v), by + 14), fill=colour)
            draw.text((x + THUMB + 124, by), f"{100 * v:4.1f}% {_short(pred.name(c), 16)}", fill=INK, font=font(11))
    return img


def neighbours_panel(queries: Pass, pool: Pass, idx: torch.Tensor, pred: Predictor) -> Image.Image:
    """Right panel: each query (first column) and its nearest training images in fc7 space."""
    k = idx.shape[1]
    gap, label_h = 6, 16
    W = (k + 1) * (THUMB + gap) + gap + 12
    H = 36 + len(idx) * (THUMB + label_h + gap)
    img = Image.new("RGB", (W, H), BACKGROUND)
    draw = ImageDraw.Draw(img)
    title = f"Figure 4 (right): query, then its {k} nearest training images (fc7, {len(pool.labels)} searched)"
    draw.text((8, 8), title, fill=INK, font=font(15))
    for q, row in enumerate(idx.tolist()):
        y = 32 + q * (THUMB + label_h + gap)
        items = [(queries.images[q], int(queries.labels[q]))] + [(pool.images[j], int(pool.labels[j])) for j in row]
        for c, (image, label) in enumerate(items):
            x = gap + c * (THUMB + gap) + (12 if c else 0)
            img.paste(_thumb(image), (x, y))
            draw.text((x, y + THUMB + 1), _short(pred.name(label), 18), fill=INK, font=font(11))
        draw.line((THUMB + gap + 9, y, THUMB + gap + 9, y + THUMB), fill=PALETTE[1], width=2)
    return img


def make_figure4(
    pred: Predictor, data_dir: Path, out_dir: Path, *, val_limit: int = 1000, train_limit: int = 1000, queries: int = 5
) -> dict:
    """Both panels and the per-class table; returns their paths, the sample sizes and the table."""
    val = run_split(pred, data_dir, "val", val_limit)
    train = run_split(pred, data_dir, "train", train_limit)
    idx = nearest(val.fc7[:queries], train.fc7)
    left, right = out_dir / "figure4_predictions.png", out_dir / "figure4_neighbours.png"
    predictions_panel(val, pred).save(left)
    neighbours_panel(val, train, idx, pred).save(right)
    return {
        "predictions": left,
        "neighbours": right,
        "val_images": len(val.labels),
        "train_searched": len(train.labels),
        "class_errors": class_errors(val, pred),
    }
