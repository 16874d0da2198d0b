"""``alexnet-prep preview``: the exact images the network sees, with their random draws, and a contact sheet."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import click
import numpy as np

from alexnet.pipeline import artifacts as A
from alexnet.pipeline import constants as C
from alexnet.pipeline import locks
from alexnet.pipeline.cli_common import config_options, data_dir_option, from_options, opt
from alexnet.pipeline.errors import AlexnetError
from alexnet.pipeline.loader import DataConfig


@dataclass(frozen=True)
class PreviewConfig:
    """``alexnet-prep preview``'s own settings; ``--mean`` and ``--lighting-scale`` are the trainer's ``DataConfig``'s."""

    split: str = opt("train", "Split.", choices=A.SPLITS)
    n: int = opt(16, "Images.", min=1, max=1024)
    seed: int = opt(0, "Seed of the order and the random draws.")
    epoch: int = opt(0, "Epoch (0 = the first).", min=0)
    out: Path = opt(
        Path("preview.npz"),
        "The .npz; the PNG sheet is written beside it (same name, .png).",
        type=click.Path(dir_okay=False, path_type=Path),
    )


def preview_batch(data_dir: Path, cfg: PreviewConfig, data: DataConfig) -> dict[str, np.ndarray]:
    """The first ``cfg.n`` images of ``cfg.epoch`` in delivery order (one replica), through the real pipeline
    with ``data``'s mean and lighting, with their draws."""
    from alexnet.pipeline.loader import create_loader

    split, n = cfg.split, cfg.n
    manifest = A.read_manifest(data_dir)
    manifest.shard_paths(data_dir, split)  # the split exists
    if manifest.splits[split].num_records < n:
        raise AlexnetError(f"the {split} split has {manifest.splits[split].num_records} records, fewer than --n {n}")
    # One batch: the reads on this thread (spawning reader processes would cost more than they save).
    data = replace(data, num_threads=2, prefetch=1, workers=0)
    loader = create_loader(data_dir, split, data, batch_size=n, seed=cfg.seed, with_draws=True)
    loader.load_state_dict({**loader.state_dict(), "epoch": cfg.epoch})
    images, labels, draws = next(iter(loader))
    out = {"images": images.numpy().astype(np.float32), "labels": labels.numpy().astype(np.int64)}
    out["index"] = draws["index"]  # record position (the key's prefix)
    if split == "train":
        out["crop_xy"] = draws["crop_xy"].astype(np.int64)
        out["mirror"] = draws["mirror"].astype(np.int64)
        out["alpha"] = draws["alpha"].astype(np.float32)
    return out


def contact_sheet(batch: dict[str, np.ndarray], data_dir: Path, classes: list[str], mean: str):
    """De-normalised images (the mean added back; the lighting shift left in, as the network sees it)."""
    from PIL import Image, ImageDraw

    images = batch["images"]
    n = len(images)
    mean_image = A.read_mean_image(data_dir)
    stats = A.read_stats(data_dir)
    tiles = []
    for i in range(n):
        hwc = images[i].transpose(1, 2, 0).astype(np.float64)
        if mean == "image":
            x, y = batch["crop_xy"][i] if "crop_xy" in batch else (16, 16)
            patch = mean_image[y : y + C.CROP_SIZE, x : x + C.CROP_SIZE]
            if "mirror" in batch and batch["mirror"][i]:
                patch = patch[:, ::-1]
            hwc = hwc + patch
        else:
            hwc = hwc + np.asarray(stats.mean_rgb)
        tiles.append(np.clip(np.rint(hwc), 0, 255).astype(np.uint8))
    cols = min(8, n)
    rows = -(-n // cols)
    pad, label_h = 4, 14
    w, h = C.CROP_SIZE + pad, C.CROP_SIZE + pad + label_h
    sheet = Image.new("RGB", (cols * w + pad, rows * h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, tile in enumerate(tiles):
        x0, y0 = pad + (i % cols) * w, pad + (i // cols) * h
        sheet.paste(Image.fromarray(tile), (x0, y0))
        label = int(batch["labels"][i])
        text = f"#{int(batch['index'][i])} {classes[label] if label < len(classes) else label}"
        if "crop_xy" in batch:
            cx, cy = batch["crop_xy"][i]
            text += f" ({cx},{cy}){' m' if batch['mirror'][i] else ''}"
        draw.text((x0, y0 + C.CROP_SIZE + 1), text, fill=(0, 0, 0))
    return sheet


@click.command(
    "preview",
    epilog="""\b
Examples:
  alexnet-prep preview --split train --n 16 --seed 0 --epoch 2 --out preview.npz
  alexnet-prep preview --split val --n 8 --out val.npz
""",
)
@data_dir_option
@config_options(PreviewConfig)
@config_options(DataConfig, only=("mean", "lighting_scale"))
def preview_command(data_dir: Path, **options) -> None:
    """Write the exact images the network sees (.npz, with the random draws) and a PNG contact sheet.

    The first N images of the epoch in delivery order (train: the epoch's shuffle, as one replica
    receives it; val: key order). The .npz holds images (N,3,224,224, as fed to the model), labels,
    index (record position: the key's prefix), and for train crop_xy (pixel offsets x, y), mirror
    (0/1) and alpha (N,3: the PCA lighting draws).
    """
    cfg, data = from_options(PreviewConfig, options), DataConfig(**options)
    with locks.hold(data_dir, locks.SHARED, "alexnet-prep preview"):
        manifest = A.read_manifest(data_dir)
        batch = preview_batch(data_dir, cfg, data)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cfg.out, **batch)
    png = cfg.out.with_suffix(".png")
    contact_sheet(batch, data_dir, manifest.classes, mean=data.mean).save(png)
    click.echo(f"wrote {cfg.out} ({cfg.n} {cfg.split} images) and {png}")
