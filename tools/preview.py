"""``alexnet-prep preview``: the exact images the network sees, with their random draws, and a contact sheet."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from alexnet.pipeline import artifacts as A
from alexnet.pipeline import constants as C
from alexnet.pipeline import locks
from alexnet.pipeline.cli_common import data_dir_option
from alexnet.pipeline.errors import AlexnetError
from alexnet.pipeline.loader import DataConfig


def preview_batch(
    data_dir: Path,
    split: str,
    n: int,
    seed: int,
    *,
    epoch: int = 0,
    mean: str = "image",
    lighting_scale: str = C.DEFAULT_LIGHTING_SCALE,
) -> dict[str, np.ndarray]:
    """The first ``n`` images of ``epoch`` in delivery order (one replica), through the real pipeline, with their draws."""
    from alexnet.pipeline.loader import create_loader

    manifest = A.read_manifest(data_dir)
    manifest.shard_paths(data_dir, split)  # the split exists
    if manifest.splits[split].num_records < n:
        raise AlexnetError(f"the {split} split has {manifest.splits[split].num_records} records, fewer than --n {n}")
    # One batch: the reads on this thread (spawning reader processes would cost more than they save).
    data = DataConfig(num_threads=2, prefetch=1, workers=0, mean=mean, lighting_scale=lighting_scale)
    loader = create_loader(data_dir, split, data, batch_size=n, seed=seed, with_draws=True)
    loader.load_state_dict({**loader.state_dict(), "epoch": epoch})
    images, labels, draws = next(iter(loader))
    out = {"images": images.numpy().astype(np.float32), "labels": labels.numpy().astype(np.int64)}
    out["index"] = draws["index"]  # record position (the key's prefix)
    if split == "train":
        out["crop_xy"] = draws["crop_xy"].astype(np.int64)
        out["mirror"] = draws["mirror"].astype(np.int64)
        out["alpha"] = draws["alpha"].astype(np.float32)
    return out


def contact_sheet(batch: dict[str, np.ndarray], data_dir: Path, classes: list[str], mean: str = "image"):
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
@click.option("--split", type=click.Choice(A.SPLITS), default="train", show_default=True)
@click.option("--n", "n", type=click.IntRange(1, 1024), default=16, show_default=True, help="Images.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the order and the random draws.")
@click.option("--epoch", type=click.IntRange(0), default=0, show_default=True, help="Epoch (0 = the first).")
@click.option("--mean", type=click.Choice(["image", "channel"]), default="image", show_default=True)
@click.option(
    "--lighting-scale", type=click.Choice(C.LIGHTING_SCALES), default=C.DEFAULT_LIGHTING_SCALE, show_default=True
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("preview.npz"),
    show_default=True,
    help="The .npz; the PNG sheet is written beside it (same name, .png).",
)
def preview_command(
    data_dir: Path, split: str, n: int, seed: int, epoch: int, mean: str, lighting_scale: str, out: Path
) -> None:
    """Write the exact images the network sees (.npz, with the random draws) and a PNG contact sheet.

    The first N images of the epoch in delivery order (train: the epoch's shuffle, as one replica
    receives it; val: key order). The .npz holds images (N,3,224,224, as fed to the model), labels,
    index (record position: the key's prefix), and for train crop_xy (pixel offsets x, y), mirror
    (0/1) and alpha (N,3: the PCA lighting draws).
    """
    with locks.hold(data_dir, locks.SHARED, "alexnet-prep preview"):
        manifest = A.read_manifest(data_dir)
        batch = preview_batch(data_dir, split, n, seed, epoch=epoch, mean=mean, lighting_scale=lighting_scale)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **batch)
    png = out.with_suffix(".png")
    contact_sheet(batch, data_dir, manifest.classes, mean=mean).save(png)
    click.echo(f"wrote {out} ({n} {split} images) and {png}")
