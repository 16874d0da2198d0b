"""``alexnet-train predict`` and ``alexnet-train export``: thin click commands over predict.py and export.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from alexnet.pipeline.errors import AlexnetError
from alexnet.pipeline.images import IMAGE_SUFFIXES

PREDICT_EPILOG = """\b
Examples:
  alexnet-train predict --checkpoint runs/a/checkpoints/best.pt photo.jpg holiday/
  alexnet-train predict --checkpoint best.pt --ten-crop --json photos/ > predictions.jsonl
"""

EXPORT_EPILOG = """\b
Examples:
  alexnet-train export --checkpoint runs/a/checkpoints/best.pt --out alexnet.pt2
  python -c "import torch; m = torch.export.load('alexnet.pt2').module(); print(m(torch.zeros(1, 3, 224, 224)).shape)"
"""


def _device(gpus: str):
    import torch

    from .replica import parse_gpus

    if gpus == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    return parse_gpus(gpus)[0]


def _checkpoint_option(multiple: bool = False):
    help = "A checkpoint written by alexnet-train (e.g. RUN/checkpoints/best.pt)."
    if multiple:
        help += " Repeated: the average of their softmax outputs (§6's averaged CNNs)."
    return click.option(
        "--checkpoint",
        "checkpoint",
        type=click.Path(dir_okay=False, path_type=Path),
        required=True,
        multiple=multiple,
        help=help,
    )


@click.command("predict", epilog=PREDICT_EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@_checkpoint_option(multiple=True)
@click.option(
    "--ten-crop", is_flag=True, help="Average the softmax over the ten patches of §4.1 (else the centre crop)."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line instead of a table.")
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Images per forward pass."
)
@click.option("--gpus", default="auto", show_default=True, help="'cpu' or one GPU index; auto: GPU 0 if any.")
def predict_command(inputs, checkpoint, ten_crop, as_json, batch_size, gpus) -> None:
    """Top-5 classes with probabilities for each image file (directories: their image files).

    Preprocessing as in training and evaluation: shorter side 256, central 256x256 patch, the dataset's mean
    image, the central 224x224 patch (or ten patches). Each checkpoint brings its own classes, mean and LRN form;
    several are averaged (§6). Files that cannot be used get one line each; the rest are still predicted, and
    the exit status is 1 if any failed.
    """
    from tqdm import tqdm

    from .predict import image_files, load_predictors, predict

    files = image_files(list(inputs))
    if not files:
        raise AlexnetError(f"no image files among the inputs (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    pred = load_predictors(list(checkpoint), _device(gpus))
    failed = 0
    bar = tqdm(total=len(files), unit="img", file=sys.stderr, disable=len(files) < 2 * batch_size)
    for rec in predict(pred, files, ten_crop=ten_crop, batch_size=batch_size, progress=bar):
        failed += "error" in rec
        if as_json:
            click.echo(json.dumps(rec))
        elif "error" in rec:
            click.echo(f"{rec['path']}: error: {rec['error']}", err=True)
        else:
            click.echo(rec["path"])
            for i, t in enumerate(rec["top5"], 1):
                click.echo(f"  {i}. {100 * t['prob']:6.2f}%  {t['wnid']}  {t['name']}")
    bar.close()
    if failed:
        raise SystemExit(1)


@click.command("export", epilog=EXPORT_EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@_checkpoint_option()
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Output file (.pt2).")
def export_command(checkpoint, out) -> None:
    """A self-contained inference file: torch.export.load(FILE).module() maps a mean-subtracted float batch
    [N, 3, 224, 224] to softmax probabilities [N, classes]; the class list and the mean image ride along in
    its alexnet.json (see trainer/export.py). Plain PyTorch loads it, without this package."""
    import torch

    from .export import export
    from .predict import load_predictor

    pred = load_predictor(checkpoint, torch.device("cpu"))
    path = export(pred, out)
    click.echo(f"wrote {path} ({path.stat().st_size / 1e6:.0f} MB, {len(pred.classes)} classes)")
