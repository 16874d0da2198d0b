"""``alexnet-prep preview`` (what the network sees) and ``alexnet-prep bench-pipeline`` (its speed)."""

from __future__ import annotations

import time
from pathlib import Path

import click
import numpy as np

from alexnet.pipeline import artifacts as A
from alexnet.pipeline import constants as C
from alexnet.pipeline.cli_common import data_dir_option
from alexnet.pipeline.errors import AlexnetError


def preview_batch(data_dir: Path, split: str, n: int, seed: int, *, mean: str = "image",
                  lighting_scale: str = C.DEFAULT_LIGHTING_SCALE) -> dict[str, np.ndarray]:  # fmt: skip
    """The first ``n`` records of ``split`` in key order, through the real pipeline, with their draws."""
    from alexnet.pipeline.loader import LoaderConfig, create_loader, preview_config

    cfg = preview_config(LoaderConfig(batch_size=n, num_threads=2, seed=seed, mean=mean, lighting_scale=lighting_scale))
    loader = create_loader(data_dir, split, cfg)
    if loader.num_records < n:
        raise AlexnetError(f"the {split} split has {loader.num_records} records, fewer than --n {n}")
    first = next(iter(loader))
    out = {"images": first[0].numpy().astype(np.float32), "labels": first[1].numpy().astype(np.int64)}
    draws = first[2]
    out["index"] = draws["index"]  # record position in key order over the shards (from the record's key)
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


@click.command("preview", epilog="""\b
Examples:
  alexnet-prep preview --split train --n 16 --seed 0 --out preview.npz
  alexnet-prep preview --split val --n 8 --out val.npz
""")  # fmt: skip
@data_dir_option
@click.option("--split", type=click.Choice(A.SPLITS), default="train", show_default=True)
@click.option("--n", "n", type=click.IntRange(1, 1024), default=16, show_default=True, help="Images.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random draws.")
@click.option("--mean", type=click.Choice(["image", "channel"]), default="image", show_default=True)
@click.option("--lighting-scale", type=click.Choice(C.LIGHTING_SCALES), default=C.DEFAULT_LIGHTING_SCALE,
              show_default=True)  # fmt: skip
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("preview.npz"),
              show_default=True, help="The .npz; the PNG sheet is written beside it (same name, .png).")  # fmt: skip
def preview_command(data_dir: Path, split: str, n: int, seed: int, mean: str, lighting_scale: str, out: Path) -> None:
    """Write the exact batch the network sees (.npz, with the random draws) and a PNG contact sheet.

    Reads the first N records in key order. The .npz holds images (N,3,224,224, as fed to the model),
    labels, index (record position in key order over the split's shards), and for train crop_xy
    (pixel offsets x, y), mirror (0/1) and alpha (N,3: the PCA lighting draws).
    """
    manifest = A.read_manifest(data_dir)
    batch = preview_batch(data_dir, split, n, seed, mean=mean, lighting_scale=lighting_scale)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **batch)
    png = out.with_suffix(".png")
    contact_sheet(batch, data_dir, manifest.classes, mean=mean).save(png)
    click.echo(f"wrote {out} ({n} {split} images) and {png}")


def bench_pipeline(
    data_dir: Path, device: str, batches: int, batch_size: int, threads: int, warmup: int = 3, pipelines: int = 1
) -> float:
    """Images/s of the train pipeline alone, delivered as torch tensors on ``device``."""
    import torch

    from alexnet.pipeline.loader import LoaderConfig, create_loader

    cfg = LoaderConfig(batch_size=batch_size, num_threads=threads, device=device, pipelines=pipelines)
    loader = create_loader(data_dir, "train", cfg)

    def endless():
        while True:
            yield from loader

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

    stream = endless()
    for _ in range(warmup):
        next(stream)
    sync()
    t0 = time.perf_counter()
    for _ in range(batches):
        next(stream)
    sync()
    return batches * batch_size / (time.perf_counter() - t0)


@click.command("bench-pipeline", epilog="""\b
Examples:
  alexnet-prep bench-pipeline --device cpu --batches 50 --threads 2
  alexnet-prep bench-pipeline --device gpu --batches 200 --threads 5 --pipelines 3
""")  # fmt: skip
@data_dir_option
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True)
@click.option("--batches", type=click.IntRange(1), default=50, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True, help="Images per pipeline batch.")
@click.option("--threads", type=click.IntRange(1), default=2, show_default=True, help="DALI CPU threads per pipeline.")
@click.option(
    "--pipelines",
    type=click.IntRange(1),
    default=None,
    help="Pipelines taking turns (default: 3 on a GPU, where one decodes one batch at a time; 1 on the CPU).",
)
def bench_pipeline_command(
    data_dir: Path, device: str, batches: int, batch_size: int, threads: int, pipelines: int | None
) -> None:
    """Run the train pipeline alone (read, decode, augment, deliver) and print its images/s."""
    dev = "cuda:0" if device == "gpu" else "cpu"
    if device == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise AlexnetError("--device gpu: no CUDA GPU is visible")
    pipelines = pipelines or (3 if device == "gpu" else 1)
    rate = bench_pipeline(data_dir, dev, batches, batch_size, threads, pipelines=pipelines)
    click.echo(
        f"train pipeline on {device}: {rate:,.0f} images/s (batch {batch_size}, {batches} batches, "
        f"{pipelines} pipeline(s) of {threads} threads)"
    )
