"""``alexnet-train report RUN_DIR``: the figures and summary users look at, for any run (CPU or GPU).

Reads a run directory through rundir.py (its files and records are defined there):
  - ``metrics.jsonl``, training's own log: the curves, the final and best validation errors (training's
    own evaluations), the completed epochs (``epoch_end`` records), the step's wait for its batches
    and the devices' peak memory;
  - ``evals.jsonl`` (when there is one): evaluations of checkpoints after training, listed apart;
  - ``config.json`` (when there is one): the class count, batch size, devices and dataset;
  - ``checkpoints/last.pt`` (or ``--checkpoint``), read by checkpoint.py: conv1's weight is the
    ``conv1.weight`` of its canonical state dict ([96, 3, 11, 11]: kernels 0-47 are column one, 48-95
    column two, §3.2).

Writes into the report folder (default ``RUN_DIR/report``): ``curves.png`` (``loss.png``, ``error.png``
and ``lr.png`` side by side), ``conv1_kernels.png`` (Figure 3's layout), ``colourfulness.json``,
``preview.png`` (a copy of the augmentation preview sheet, when there is one), Figure 4's two panels
(when the run's dataset is at hand) and ``report.md``.

Colourfulness of a conv1 kernel w (3 x 11 x 11, RGB), with g(y,x) = mean_c w(c,y,x) its grey part
and w̄ the mean of all its values:

    colourfulness(w) = sqrt( Σ_c,y,x (w(c,y,x) − g(y,x))² / Σ_c,y,x (w(c,y,x) − w̄)² )

the share (an RMS ratio, 0..1; grey and colour parts are orthogonal) of the kernel's contrast that
lies in colour differences: 0 for a grey kernel (R = G = B), 1 for a purely colour-opponent one,
about sqrt(2/3) for random N(0, σ²) kernels (§5). A column's score is the mean over its kernels;
the paper's column one becomes largely colour-agnostic, column two colour-specific (§3.2, Figure 3).
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
from PIL import Image, ImageDraw

from alexnet.pipeline import artifacts as A
from alexnet.pipeline.errors import AlexnetError

from .config import TrainConfig
from .plots import BACKGROUND, INK, PALETTE, Axes, Series, font, hstack, line_plot, text_size
from .rundir import RunDir, by_kind, read_log

KERNEL_GRID_COLS = 8  # Figure 3: 48 kernels per column as 6 rows of 8
KERNEL_UPSCALE = 4  # 11x11 kernels drawn 44x44, nearest neighbour
RANDOM_KERNEL_COLOURFULNESS = math.sqrt(2 / 3)  # expected score of i.i.d. Gaussian kernels


# ---------------------------------------- inputs


@dataclass
class Metrics:
    """A run's records by kind (rundir.py): training's own log, then the evaluations of checkpoints."""

    train: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)  # training's own validations
    alerts: list[dict[str, Any]] = field(default_factory=list)  # the trainer's stalled/exploding warnings
    epochs: int = 0  # completed epochs (the last epoch_end record)
    checkpoint_evals: list[dict[str, Any]] = field(default_factory=list)  # evals.jsonl


def read_metrics(run: RunDir) -> Metrics:
    records = read_log(run.metrics)
    ends = by_kind(records, "epoch_end")
    m = Metrics(
        train=by_kind(records, "train"),
        evals=by_kind(records, "eval"),
        alerts=by_kind(records, "alert"),
        epochs=int(ends[-1]["epoch"]) if ends else 0,
        checkpoint_evals=by_kind(read_log(run.evals), "checkpoint_eval") if run.evals.exists() else [],
    )
    if not m.train and not m.evals:
        raise AlexnetError(f"{run.metrics} has no metrics lines yet")
    return m


def read_config(run: RunDir) -> TrainConfig | None:
    return TrainConfig.load(run.config) if run.config.is_file() else None


def conv1_weights(state: dict[str, Any]) -> np.ndarray:
    """conv1's kernels as float64 [N, 3, kh, kw], column one first (§3.2), from a canonical state dict."""
    w = state["conv1.weight"].detach().cpu().double().numpy()
    if w.ndim != 4 or w.shape[1] != 3 or w.shape[0] % 2:
        raise AlexnetError(f"conv1.weight has shape {list(w.shape)}; expected [2n, 3, k, k] (two columns, RGB)")
    return w


# ---------------------------------------- numbers


def colourfulness(kernels: np.ndarray) -> np.ndarray:
    """Per-kernel colourfulness of [N, 3, h, w] kernels (formula in the module docstring)."""
    k = np.asarray(kernels, dtype=np.float64)
    grey = k.mean(axis=1, keepdims=True)
    colour = ((k - grey) ** 2).sum(axis=(1, 2, 3))
    total = ((k - k.mean(axis=(1, 2, 3), keepdims=True)) ** 2).sum(axis=(1, 2, 3))
    out = np.zeros(len(k))
    nz = total > 1e-30
    out[nz] = np.sqrt(colour[nz] / total[nz])
    return out


def chance_errors(num_classes: int | None) -> dict[int, float]:
    """Top-k error of guessing: {1: 1 − 1/c, 5: 1 − 5/c (only when c > 5)}; empty without a class count."""
    return {k: 1 - k / num_classes for k in (1, 5) if num_classes and (k == 1 or num_classes > k)}


@dataclass(frozen=True)
class EvalRow:
    split: str
    ten_crop: bool
    final_top1: float
    final_top5: float | None
    final_epoch: Any
    best_top1: float
    best_top5: float | None
    best_epoch: Any
    points: int


def eval_rows(evals: list[dict[str, Any]]) -> list[EvalRow]:
    groups: dict[tuple[str, bool], list[dict[str, Any]]] = {}
    for rec in evals:
        groups.setdefault((rec["split"], rec["ten_crop"]), []).append(rec)
    rows = []
    for (split, ten), recs in groups.items():
        last = recs[-1]
        best = min(recs, key=lambda r: float(r["top1_err"]))
        rows.append(
            EvalRow(
                split=split,
                ten_crop=ten,
                points=len(recs),
                final_top1=last["top1_err"],
                final_top5=last["top5_err"],
                final_epoch=last["epoch"],
                best_top1=best["top1_err"],
                best_top5=best["top5_err"],
                best_epoch=best["epoch"],
            )
        )
    rows.sort(key=lambda r: (r.split != "val", r.split, r.ten_crop))
    return rows


def training_time_s(train: list[dict[str, Any]]) -> float | None:
    """The run's training time at its last log point (a resumed run's includes the killed run's)."""
    return max((float(r["elapsed_s"]) for r in train), default=None)


def _finite(values: Iterable[Any]) -> list[float]:
    return [v for v in (float(x) for x in values if x is not None) if math.isfinite(v)]


def moving_average(values: list[float], window: int) -> list[float]:
    """Centred moving average (shorter windows at the ends), so the smoothed curve does not lag."""
    if window <= 1 or len(values) < 2:
        return list(values)
    c = np.cumsum(np.insert(np.asarray(values, dtype=np.float64), 0, 0.0))
    n, half = len(values), window // 2
    lo = np.clip(np.arange(n) - half, 0, n)
    hi = np.clip(np.arange(n) + half + 1, 0, n)
    return list((c[hi] - c[lo]) / (hi - lo))


# ---------------------------------------- figures


def curve_figures(metrics: Metrics, num_classes: int | None) -> dict[str, Any]:
    """``{"loss": Image, "error": Image, "lr": Image}``."""
    tr = metrics.train
    steps = [r["step"] for r in tr]
    lr = line_plot(
        [Series("learning rate", steps, [r["lr"] for r in tr], color=PALETTE[2])],
        Axes("Learning rate", "step", "learning rate (log scale)", logy=True),
    )
    return {
        "loss": _loss_figure(steps, [r["loss"] for r in tr]),
        "error": _error_figure(metrics.evals, num_classes),
        "lr": lr,
    }


def _loss_figure(steps: list[Any], losses: list[Any]):
    """The logged loss, with a moving average over it once there are 10 finite points."""
    finite = [(s, v) for s, v in zip(steps, losses, strict=True) if v is not None and math.isfinite(float(v))]
    series = [Series("loss (logged)", steps, losses, color=(160, 190, 220), width=1)]
    if len(finite) >= 10:
        window = max(len(finite) // 20, 2)
        xs = [s for s, _ in finite]
        series.append(Series(f"moving average ({window})", xs, moving_average([v for _, v in finite], window)))
    return line_plot(series, Axes("Training loss", "step", "cross-entropy loss"))


def _error_figure(evals: list[dict[str, Any]], num_classes: int | None):
    """Training's own validations: top-1 and top-5 error per epoch, with the chance levels."""
    xs = [r["epoch"] for r in evals]
    series = [
        Series(name, xs, [100 * r[key] for r in evals], color=colour, markers=True)
        for name, key, colour in (("top-1", "top1_err", PALETTE[0]), ("top-5", "top5_err", PALETTE[1]))
    ]
    hlines = tuple((100 * err, f"chance top-{k}") for k, err in chance_errors(num_classes).items())
    return line_plot(series, Axes("val error (centre crop)", "epoch", "error (%)", ylim=(0.0, 100.0), hlines=hlines))


def kernel_grid(weights: np.ndarray, scores: np.ndarray | None = None):
    """Figure 3's layout: one block per column, 8 kernels per row, each min-max normalised over its three
    channels together (so its colours keep their relative strength) and upscaled with nearest neighbour."""
    w = np.asarray(weights, dtype=np.float64)
    n, _, kh, kw = w.shape
    half = n // 2
    lo = w.min(axis=(1, 2, 3), keepdims=True)
    span = w.max(axis=(1, 2, 3), keepdims=True) - lo
    norm = np.where(span > 0, (w - lo) / np.where(span > 0, span, 1.0), 0.5)
    tiles = (norm.transpose(0, 2, 3, 1) * 255.0 + 0.5).astype(np.uint8)  # [N, kh, kw, RGB]

    s, gap = KERNEL_UPSCALE, 2
    cols = min(KERNEL_GRID_COLS, half)
    rows = math.ceil(half / cols)
    tile_w, tile_h = kw * s, kh * s
    block_w, block_h = cols * tile_w + (cols - 1) * gap, rows * tile_h + (rows - 1) * gap
    margin, between, header = 12, 28, 44
    W = 2 * block_w + between + 2 * margin
    H = header + block_h + margin + 18
    img = Image.new("RGB", (W, H), BACKGROUND)
    draw = ImageDraw.Draw(img)
    title = f"conv1: {n} kernels of {kh}x{kw}x3 (paper Figure 3: one block per column)"
    draw.text((margin, 4), title, font=font(13), fill=INK)
    for c in range(2):
        x0 = margin + c * (block_w + between)
        label = f"column {c + 1} (kernels {c * half}-{(c + 1) * half - 1})"
        if scores is not None:
            label += f"   colourfulness {float(np.mean(scores[c * half : (c + 1) * half])):.3f}"
        draw.text((x0, 24), label, font=font(12), fill=INK)
        draw.rectangle([x0 - 2, header - 2, x0 + block_w + 1, header + block_h + 1], fill=(60, 60, 60))
        for i in range(half):
            r, q = divmod(i, cols)
            tile = Image.fromarray(tiles[c * half + i], "RGB").resize((tile_w, tile_h), Image.NEAREST)
            img.paste(tile, (x0 + q * (tile_w + gap), header + r * (tile_h + gap)))
    note = "each kernel min-max normalised over its three channels; nearest-neighbour upscaling x4"
    nw, _ = text_size(draw, note, font(11))
    draw.text((W - margin - nw, H - 16), note, font=font(11), fill=(110, 110, 110))
    return img


# ---------------------------------------- the report


@dataclass
class ReportResult:
    out_dir: Path
    images: dict[str, Path]
    rows: list[EvalRow]
    num_classes: int | None
    column_scores: tuple[float, float] | None
    notes: list[str]
    figure4: dict | None = None  # trainer/figure4.py: panel paths, sample sizes, per-class errors
    checkpoint_evals: list[dict[str, Any]] = field(default_factory=list)  # evals.jsonl's records


def _write(path: Path, data: bytes) -> Path:
    # Replace-by-rename so a reader never sees half a file; unlike artifacts.atomic_write_bytes
    # (mkstemp, mode 0600) the report's files get the umask's permissions, for sharing.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def _save_png(img, path: Path) -> Path:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return _write(path, buf.getvalue())


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f}%"


def _duration(s: float | None) -> str:
    if s is None:
        return "not recorded"
    h, rem = divmod(int(round(s)), 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h {m:02d}m {sec:02d}s ({s:,.0f} s)" if h else f"{m}m {sec:02d}s ({s:,.0f} s)"


def build_report(
    run_dir: Path,
    out_dir: Path | None = None,
    preview_png: Path | None = None,
    checkpoint: Path | None = None,
) -> ReportResult:
    """Write the report folder for ``run_dir`` (``report.md`` and the figures); returns what it wrote."""
    run = RunDir(run_dir)
    if not run.root.is_dir():
        raise AlexnetError(f"run directory {run.root} does not exist: give the --run-dir of an alexnet-train run")
    metrics = read_metrics(run)
    config = read_config(run)
    out_dir = Path(out_dir) if out_dir is not None else run.report
    if preview_png is not None and not Path(preview_png).is_file():
        raise AlexnetError(f"preview sheet {preview_png} does not exist (alexnet-prep preview writes one)")
    out_dir.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    ckpt_path = Path(checkpoint) if checkpoint is not None else run.last
    state = _read_checkpoint(ckpt_path, checkpoint is not None, notes)
    num_classes = config.run.num_classes if config is not None else None
    if not num_classes and state is not None:
        num_classes = int(state["fc8.weight"].shape[0])

    images = _write_curves(metrics, num_classes, out_dir)
    column_scores = None
    if state is not None:
        column_scores, images["conv1_kernels"] = _write_conv1(state, ckpt_path, out_dir)
    preview = _copy_preview(Path(preview_png) if preview_png is not None else run.preview, out_dir, notes)
    if preview is not None:
        images["preview"] = preview
    figure4 = _figure4(ckpt_path if state is not None else None, config, out_dir, notes)
    if figure4:
        images["figure4_predictions"], images["figure4_neighbours"] = figure4["predictions"], figure4["neighbours"]
    rows = eval_rows(metrics.evals)
    result = ReportResult(out_dir, images, rows, num_classes, column_scores, notes, figure4, metrics.checkpoint_evals)
    _write(out_dir / "report.md", render_markdown(result, run.root, metrics, config).encode())
    return result


def _read_checkpoint(path: Path, given: bool, notes: list[str]) -> dict[str, Any] | None:
    """The checkpoint's canonical state dict (checkpoint.py); a missing default checkpoint is a note, a
    missing ``--checkpoint`` an error."""
    if not path.exists() and not given:
        notes.append(f"no checkpoint at {path}: the conv1 figure is left out")
        return None
    from .checkpoint import load_checkpoint

    return load_checkpoint(path)["model"]


def _write_curves(metrics: Metrics, num_classes: int | None, out_dir: Path) -> dict[str, Path]:
    """loss.png, error.png, lr.png and the three side by side, curves.png."""
    figs = curve_figures(metrics, num_classes)
    images = {name: _save_png(img, out_dir / f"{name}.png") for name, img in figs.items()}
    images["curves"] = _save_png(hstack([figs["loss"], figs["error"], figs["lr"]]), out_dir / "curves.png")
    return images


def _write_conv1(state: dict[str, Any], ckpt_path: Path, out_dir: Path) -> tuple[tuple[float, float], Path]:
    """conv1_kernels.png and colourfulness.json; returns the columns' mean scores and the figure's path."""
    w = conv1_weights(state)
    scores = colourfulness(w)
    half = len(w) // 2
    columns = (scores[:half], scores[half:])
    means = (float(columns[0].mean()), float(columns[1].mean()))
    figure = _save_png(kernel_grid(w, scores), out_dir / "conv1_kernels.png")
    doc = {
        "formula": "sqrt(sum_cyx (w - mean_c w)^2 / sum_cyx (w - mean w)^2) per kernel; column = mean",
        "random_kernel_expectation": RANDOM_KERNEL_COLOURFULNESS,
        "checkpoint": str(ckpt_path),
        "columns": [
            {
                "column": c + 1,
                "kernels": [c * half, (c + 1) * half - 1],
                "mean": means[c],
                "per_kernel": [round(float(v), 6) for v in columns[c]],
            }
            for c in range(2)
        ],
    }
    _write(out_dir / "colourfulness.json", json.dumps(doc, indent=2).encode())
    return means, figure


def _copy_preview(src: Path, out_dir: Path, notes: list[str]) -> Path | None:
    """The augmentation preview sheet copied into the report folder, or a note that there is none."""
    if not src.is_file():
        notes.append("no preview sheet (alexnet-prep preview --out preview.npz writes one; pass --preview)")
        return None
    dest = out_dir / "preview.png"  # the report folder's name for it, whatever the sheet was called
    if src.resolve() != dest.resolve():
        shutil.copyfile(src, dest)
    return dest


def _figure4(ckpt_path: Path | None, config: TrainConfig | None, out_dir: Path, notes: list[str]) -> dict | None:
    """Figure 4's panels and the per-class table, when the checkpoint and its dataset are at hand."""
    data_dir = config.run.data_dir if config is not None else None
    try:
        manifest = A.read_manifest(Path(data_dir)) if data_dir and ckpt_path is not None else None
    except AlexnetError:
        manifest = None
    if manifest is None or not all(manifest.splits.get(s) and manifest.splits[s].num_records for s in ("train", "val")):
        notes.append("Figure 4 needs the run's checkpoint and its dataset with train and val records: left out")
        return None
    import torch

    from .figure4 import make_figure4
    from .predict import load_predictor

    try:
        pred = load_predictor(ckpt_path, torch.device("cpu"))
        return make_figure4(pred, Path(data_dir), out_dir)
    except AlexnetError as e:
        notes.append(f"Figure 4 left out: {e}")
        return None


CAPTIONS = {
    "curves": "Training curves: loss, error, learning rate",
    "loss": "Training loss",
    "error": "Top-1 / top-5 validation error during training (centre crop; chance dotted)",
    "lr": "Learning rate",
    "conv1_kernels": "conv1 kernels, one block per column (paper Figure 3)",
    "preview": "Augmentation preview: the batch the network sees",
    "figure4_predictions": "Figure 4, left: validation images with their top-5",
    "figure4_neighbours": "Figure 4, right: nearest training images in fc7 space",
}


def render_markdown(res: ReportResult, run_dir: Path, metrics: Metrics, config: TrainConfig | None) -> str:
    lines = [f"# Training report: `{run_dir.resolve().name}`", "", f"Run directory: `{run_dir}`", ""]
    lines += _accuracy_markdown(res.rows, res.num_classes)
    lines += _checkpoint_evals_markdown(metrics.checkpoint_evals) if metrics.checkpoint_evals else []
    lines += _training_markdown(metrics, config)
    lines += _figure4_markdown(res.figure4, res.out_dir) if res.figure4 else []
    lines += _figures_markdown(res.images, res.out_dir)
    lines += _colourfulness_markdown(*res.column_scores) if res.column_scores is not None else []
    if res.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in res.notes] + [""]
    return "\n".join(lines)


def _rel(path: Path, out_dir: Path) -> str:
    """A link from report.md: relative inside the report folder, else the path as given."""
    return path.relative_to(out_dir).as_posix() if path.is_relative_to(out_dir) else str(path)


def _accuracy_markdown(rows: list[EvalRow], num_classes: int | None) -> list[str]:
    lines = ["## Accuracy", ""]
    if rows:
        lines += [
            "| split | test | final top-1 err | final top-5 err | at epoch | best top-1 err | best top-5 err | at epoch |",
            "|---|---|---|---|---|---|---|---|",
        ]
    else:
        lines.append("No validation during training yet.")
    for r in rows:
        test = "ten patches (§4.1)" if r.ten_crop else "centre crop"
        lines.append(
            f"| {r.split} | {test} | {_pct(r.final_top1)} | {_pct(r.final_top5)} | {r.final_epoch} "
            f"| {_pct(r.best_top1)} | {_pct(r.best_top5)} | {r.best_epoch} |"
        )
    chance = chance_errors(num_classes)
    if chance:
        c = num_classes
        top5 = f", top-5 error 1 − 5/{c} = {_pct(chance[5])}" if 5 in chance else ""
        lines += ["", f"Chance level with {c} classes: top-1 error 1 − 1/{c} = {_pct(chance[1])}{top5}."]
    return lines + ["", "Paper (ILSVRC-2012 val, one CNN, ten patches): 40.7% top-1, 18.2% top-5 error.", ""]


def _checkpoint_evals_markdown(recs: list[dict[str, Any]]) -> list[str]:
    """Evaluations of saved checkpoints after training (evals.jsonl), one row each, oldest first."""
    lines = [
        "## Evaluations of checkpoints (alexnet-train eval)",
        "",
        "| checkpoint | step | epoch | dataset | split | test | top-1 err | top-5 err | images |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in recs:
        test = "ten patches (§4.1)" if r["ten_crop"] else "centre crop"
        lines.append(
            f"| `{r['checkpoint']}` | {r['step']} | {r['epoch']} | `{r['dataset']}` | {r['split']} | {test} "
            f"| {_pct(r['top1_err'])} | {_pct(r['top5_err'])} | {r['images']} |"
        )
    return lines + [""]


def _training_markdown(metrics: Metrics, config: TrainConfig | None) -> list[str]:
    tr = metrics.train
    steps = [r["step"] for r in tr]
    losses, lrs, ips = (_finite(r[key] for r in tr) for key in ("loss", "lr", "images_per_s"))
    ips_text = f"{statistics.median(ips):,.1f}" if ips else "–"
    lines = [
        "## Training",
        "",
        f"- steps: {max(steps) if steps else '–'}; epochs completed: {metrics.epochs}",
        f"- training time: {_duration(training_time_s(tr))}",
        f"- images/s (median of logged intervals): {ips_text}",
    ]
    lines += _feed_and_memory_lines(tr)
    if losses:
        lines.append(f"- loss: first {losses[0]:.4f}, last {losses[-1]:.4f}")
    if lrs:
        lines.append(f"- learning rate: first {lrs[0]:g}, last {lrs[-1]:g}")
    if config is not None:
        lines += [f"- batch size: {config.optim.batch_size}", f"- gpus: {config.run.gpus}"]
    return lines + [f"- step {a.get('step')}: {a.get('message')}" for a in metrics.alerts] + [""]


def _feed_and_memory_lines(tr: list[dict[str, Any]]) -> list[str]:
    """The step's wait for its batches (median and worst share of the logged intervals) and each device's
    peak memory (the largest of the logged peaks), where the log has them."""
    lines = []
    shares = _finite(r.get("feed_wait_share") for r in tr)
    if shares:
        lines.append(
            f"- feed wait (the step waiting for its batch): median {100 * statistics.median(shares):.1f}% of "
            f"the logged intervals' time, worst {100 * max(shares):.1f}%"
        )
    peaks: dict[str, list[float]] = {}
    for r in tr:
        for device, m in (r.get("memory") or {}).items():
            old = peaks.setdefault(device, [0.0, 0.0])
            peaks[device] = [
                max(old[0], m.get("peak_allocated_gib", 0.0)),
                max(old[1], m.get("peak_reserved_gib", 0.0)),
            ]
    for device, (allocated, reserved) in peaks.items():
        lines.append(f"- {device} peak memory: {allocated:.2f} GiB allocated, {reserved:.2f} GiB reserved")
    return lines


def _figure4_markdown(f: dict, out_dir: Path) -> list[str]:
    lines = [
        "## Figure 4 (§6.1) and per-class error",
        "",
        f"![{CAPTIONS['figure4_predictions']}]({_rel(f['predictions'], out_dir)})",
        "",
        f"![{CAPTIONS['figure4_neighbours']}]({_rel(f['neighbours'], out_dir)})",
        "",
        f"Neighbours searched among the first {f['train_searched']} training records (a bounded sample, so "
        f"that the report stays fast); per-class error on the first {f['val_images']} validation records, "
        "centre crop. The ten worst classes:",
        "",
        "| class | name | images | top-1 error |",
        "|---|---|---|---|",
    ]
    lines += [f"| {wnid} | {name} | {n} | {_pct(err)} |" for wnid, name, n, err in f["class_errors"][:10]]
    return lines + [""]


def _figures_markdown(images: dict[str, Path], out_dir: Path) -> list[str]:
    """The main figures inline, then a list of every image in the folder."""
    lines = ["## Figures", ""]
    for key in ("curves", "conv1_kernels", "preview"):
        if key in images:
            lines += [f"![{CAPTIONS[key]}]({_rel(images[key], out_dir)})", ""]
    lines += ["All images in this folder:", ""]
    return lines + [f"- `{_rel(p, out_dir)}`: {CAPTIONS[key]}" for key, p in images.items()] + [""]


def _colourfulness_markdown(c1: float, c2: float) -> list[str]:
    return [
        "## conv1 colourfulness per column",
        "",
        "| column | kernels | colourfulness |",
        "|---|---|---|",
        f"| one | first half | {c1:.3f} |",
        f"| two | second half | {c2:.3f} |",
        "",
        "Colourfulness of a kernel w (RGB): sqrt(Σ (w − grey)² / Σ (w − mean)²), where grey is the mean over",
        "the three channels at each pixel: the share of the kernel's contrast in colour differences",
        f"(0 = grey, 1 = purely colour-opponent; random initial kernels ≈ {RANDOM_KERNEL_COLOURFULNESS:.2f}).",
        "On ImageNet the paper's column one becomes largely colour-agnostic and column two colour-specific",
        "(§3.2, Figure 3), i.e. column one scores lower. Per-kernel values: `colourfulness.json`.",
        "",
    ]


# ---------------------------------------- CLI

EPILOG = """\b
Examples:
  alexnet-train report runs/alexnet              # -> runs/alexnet/report/report.md and PNGs
  alexnet-train report runs/alexnet --out /tmp/r --preview demo/preview.png
  alexnet-train report runs/alexnet --checkpoint runs/alexnet/checkpoints/best.pt
"""


@click.command("report", epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Report folder.  [default: RUN_DIR/report]",
)
@click.option(
    "--preview",
    "preview_png",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Augmentation preview sheet to include.  [default: RUN_DIR/preview.png if present]",
)
@click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Checkpoint for the conv1 kernels and Figure 4.  [default: RUN_DIR/checkpoints/last.pt]",
)
def report_command(run_dir: Path, out_dir: Path | None, preview_png: Path | None, checkpoint: Path | None) -> None:
    """Training curves, conv1 kernels per column (Figure 3) and a markdown summary for RUN_DIR."""
    res = build_report(run_dir, out_dir, preview_png, checkpoint)
    for r in res.rows:
        test = "ten patches" if r.ten_crop else "centre crop"
        click.echo(
            f"{r.split} {test}: top-1 error {_pct(r.final_top1)}, top-5 error {_pct(r.final_top5)} at epoch "
            f"{r.final_epoch} (best top-1 {_pct(r.best_top1)} at epoch {r.best_epoch})"
        )
    for e in res.checkpoint_evals:
        test = "ten patches" if e["ten_crop"] else "centre crop"
        click.echo(
            f"checkpoint {e['checkpoint']} (epoch {e['epoch']}) on {e['dataset']} {e['split']}, {test}: "
            f"top-1 error {_pct(e['top1_err'])}, top-5 error {_pct(e['top5_err'])}"
        )
    if res.num_classes:
        click.echo(f"chance: top-1 error {_pct(chance_errors(res.num_classes)[1])} ({res.num_classes} classes)")
    if res.column_scores is not None:
        click.echo(f"conv1 colourfulness: column one {res.column_scores[0]:.3f}, column two {res.column_scores[1]:.3f}")
    for note in res.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"report: {res.out_dir / 'report.md'} ({len(res.images)} images)")
