"""``alexnet-train report``: figures, conv1 kernels per column, colourfulness, summary, CLI errors.

The run directory is built here with the trainer's own writers (rundir.py's records, config.py's
config.json, checkpoint.py's save_checkpoint of the real AlexNet's state dict with conv1 replaced by
known kernels: column one grey, column two colourful). One test trains a real run and evaluates an
earlier checkpoint of it afterwards (issue 28's new-user report).
"""

from __future__ import annotations

import json
import math

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from alexnet.pipeline.cli_common import Group
from alexnet.trainer import plots, report
from alexnet.trainer.checkpoint import save_checkpoint
from alexnet.trainer.config import TrainConfig
from alexnet.trainer.report import build_report, colourfulness, report_command
from alexnet.trainer.rundir import RunDir, record

NUM_CLASSES = 10


def colourfulness_reference(kernels: np.ndarray) -> np.ndarray:
    """Plain loops over kernels, pixels and channels (the formula in trainer/report.py)."""
    out = []
    for k in kernels:
        c, h, w = k.shape
        mean_all = sum(float(k[ci, y, x]) for ci in range(c) for y in range(h) for x in range(w)) / (c * h * w)
        colour = total = 0.0
        for y in range(h):
            for x in range(w):
                grey = sum(float(k[ci, y, x]) for ci in range(c)) / c
                for ci in range(c):
                    colour += (float(k[ci, y, x]) - grey) ** 2
                    total += (float(k[ci, y, x]) - mean_all) ** 2
        out.append(math.sqrt(colour / total) if total > 0 else 0.0)
    return np.array(out)


def known_conv1(seed: int = 0) -> np.ndarray:
    """96 kernels: 48 grey (R = G = B) then 48 with independent channels."""
    rng = np.random.default_rng(seed)
    grey = np.repeat(rng.normal(0, 0.01, (48, 1, 11, 11)), 3, axis=1)
    colour = rng.normal(0, 0.01, (48, 3, 11, 11))
    return np.concatenate([grey, colour]).astype(np.float32)


def _state_dict(conv1: np.ndarray) -> dict[str, torch.Tensor]:
    from alexnet.trainer.model import AlexNet

    state = AlexNet(num_classes=NUM_CLASSES).state_dict()
    assert state["conv1.weight"].shape == (96, 3, 11, 11)
    state["conv1.weight"] = torch.from_numpy(conv1)
    return state


def _stamped(rec: dict, elapsed_s: float) -> dict:
    return {**rec, "elapsed_s": elapsed_s, "time": 1.7e9 + elapsed_s}


def write_run(run, *, with_checkpoint=True, preview=True, conv1=None):
    """Four epochs of 50 steps: train records every 10 steps, a validation and an epoch_end record at each
    epoch's end, and a ten-patch evaluation of the last checkpoint in evals.jsonl."""
    run = RunDir(run)
    run.root.mkdir(parents=True)
    lines = []
    for step in range(10, 201, 10):
        loss = 2.3 * math.exp(-step / 80) + 0.05
        epoch, progress = (step - 1) // 50, (step - 1) % 50 / 50 + 0.02
        rec = record(
            "train",
            step=step,
            epoch=epoch,
            epoch_progress=progress,
            loss=loss,
            lr=0.01 if step < 150 else 0.001,
            images_per_s=100.0 + step % 7,
        )
        lines.append(_stamped(rec, 0.5 * step - 5))
    for epoch, (t1, t5) in enumerate([(0.8, 0.45), (0.5, 0.2), (0.55, 0.25), (0.4, 0.15)], 1):
        lines.append(_stamped(record("epoch_end", epoch=epoch, step=50 * epoch), 25.0 * epoch))
        rec = record(
            "eval", split="val", ten_crop=False, step=50 * epoch, epoch=epoch, top1_err=t1, top5_err=t5, images=200
        )
        lines.append(_stamped(rec, 25.0 * epoch))
    run.metrics.write_text("".join(json.dumps(r) + "\n" for r in lines))
    posthoc = record(
        "checkpoint_eval",
        checkpoint=str(run.last),
        dataset="data",
        split="val",
        ten_crop=True,
        step=200,
        epoch=4,
        top1_err=0.35,
        top5_err=0.12,
        images=200,
    )
    run.evals.write_text(json.dumps({**posthoc, "time": 1.7e9}) + "\n")
    TrainConfig.create(num_classes=NUM_CLASSES, batch_size=32).save(run.config)
    if with_checkpoint:
        state = _state_dict(known_conv1() if conv1 is None else conv1)
        save_checkpoint(run.last, {"model": state, "step": 200, "epoch": 4})
    if preview:
        Image.new("RGB", (64, 48), (10, 200, 30)).save(run.preview)
    return run.root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("report") / "run")


@pytest.fixture(scope="module")
def made(run_dir):
    return build_report(run_dir).out_dir


def _cli():
    @click.group(cls=Group)
    def cli():
        pass

    cli.add_command(report_command)
    return cli


# ---------------------------------------------------------------- colourfulness


def test_colourfulness_matches_numpy_reference():
    rng = np.random.default_rng(1)
    k = rng.normal(size=(6, 3, 5, 5))
    k[1] = np.repeat(k[1, :1], 3, axis=0)  # grey
    k[2, 0], k[2, 1], k[2, 2] = k[2, 0], -k[2, 0], 0.0  # pure red-green opponent: no grey part
    k[3] = 0.25  # constant: no contrast at all
    got = colourfulness(k)
    np.testing.assert_allclose(got, colourfulness_reference(k), rtol=1e-12, atol=1e-12)
    assert got[1] == pytest.approx(0.0, abs=1e-12)
    assert got[2] == pytest.approx(1.0)
    assert got[3] == 0.0
    assert np.all((got >= 0) & (got <= 1 + 1e-12))
    # Invariant to the kernel's scale and offset (it measures shape, not magnitude).
    np.testing.assert_allclose(colourfulness(3.0 * k[[0, 4, 5]] + 7.0), got[[0, 4, 5]], rtol=1e-9)


def test_grey_column_scores_zero_and_colour_column_clearly_higher():
    w = known_conv1()
    s = colourfulness(w)
    grey, colour = s[:48].mean(), s[48:].mean()
    assert grey == pytest.approx(0.0, abs=1e-6)
    assert colour > 0.7  # random i.i.d. channels: about sqrt(2/3)
    assert colour == pytest.approx(report.RANDOM_KERNEL_COLOURFULNESS, abs=0.03)
    np.testing.assert_allclose(s[:4], colourfulness_reference(w[:4]), atol=1e-6)
    np.testing.assert_allclose(s[48:52], colourfulness_reference(w[48:52]), rtol=1e-5)


# ---------------------------------------------------------------- the report folder


def test_report_writes_every_figure(made):
    assert made.is_dir() and made.name == "report"
    sizes = {}
    for name in ("curves", "loss", "error", "lr", "conv1_kernels", "preview"):
        path = made / f"{name}.png"
        assert path.is_file(), name
        with Image.open(path) as im:
            im.load()
            sizes[name] = im.size
            assert im.mode == "RGB"
            assert np.asarray(im).std() > 5, f"{name}.png is blank"
    for name in ("loss", "error", "lr"):
        w, h = sizes[name]
        assert 400 <= w <= 2000 and 250 <= h <= 1200
    assert sizes["curves"][0] >= 3 * sizes["loss"][0]
    assert sizes["preview"] == (64, 48)


def _ink_columns(arr: np.ndarray) -> np.ndarray:
    """Which x columns of the kernel band hold anything but white background."""
    return (arr != 255).any(axis=(0, 2))


def test_kernel_grid_has_two_blocks_grey_then_colour(made):
    with Image.open(made / "conv1_kernels.png") as im:
        arr = np.asarray(im.convert("RGB")).astype(int)
    band = arr[60:-30]  # below the labels, above the footnote: only kernel tiles and frames
    ink = _ink_columns(band)
    # Runs of inked columns: exactly two blocks separated by a white gap.
    edges = np.flatnonzero(np.diff(ink.astype(int)))
    runs = [(a + 1, b + 1) for a, b in zip(edges[::2], edges[1::2], strict=False)]
    assert len(runs) == 2, runs
    (l0, l1), (r0, r1) = runs
    assert r0 - l1 >= 10  # the gap between the columns
    assert abs((l1 - l0) - (r1 - r0)) <= 1  # same width
    # 8 tiles of 11 * 4 pixels per row (plus frames) in each block.
    assert (l1 - l0) >= 8 * 11 * report.KERNEL_UPSCALE
    left, right = band[:, l0:l1], band[:, r0:r1]
    assert np.all(left[..., 0] == left[..., 1]) and np.all(left[..., 1] == left[..., 2])  # grey kernels
    assert (right[..., 0] != right[..., 1]).mean() > 0.5  # colourful kernels


def test_kernel_tiles_are_min_max_normalised_kernels():
    w = known_conv1(3)
    img = np.asarray(report.kernel_grid(w))
    header, s = 44, report.KERNEL_UPSCALE
    x0 = 12
    tile = img[header : header + 11 * s : s, x0 : x0 + 11 * s : s]  # kernel 0, one pixel per cell
    k = w[0].transpose(1, 2, 0).astype(np.float64)
    expected = np.floor((k - k.min()) / (k.max() - k.min()) * 255 + 0.5)
    np.testing.assert_array_equal(tile, expected.astype(np.uint8))


def test_colourfulness_json_and_summary(made):
    data = json.loads((made / "colourfulness.json").read_text())
    ref = colourfulness_reference(known_conv1()[[0, 1, 48, 49]])
    c1, c2 = data["columns"]
    assert c1["mean"] == pytest.approx(0.0, abs=1e-6) and c2["mean"] > 0.7
    assert c1["per_kernel"][:2] == pytest.approx(ref[:2], abs=1e-5)
    assert c2["per_kernel"][:2] == pytest.approx(ref[2:], abs=1e-5)
    md = (made / "report.md").read_text()
    for name in ("curves.png", "conv1_kernels.png", "preview.png", "loss.png", "error.png", "lr.png"):
        assert name in md
    assert "](curves.png)" in md and "](conv1_kernels.png)" in md  # relative links that render
    # Final and best (training's centre crop), the checkpoint's ten patches apart, chance levels for 10 classes.
    assert "| val | centre crop | 40.00% | 15.00% | 4 | 40.00% | 15.00% | 4 |" in md
    assert "ten patches (§4.1) | 35.00% | 12.00% | 200 |" in md.split("## Evaluations of checkpoints")[1]
    assert "90.00%" in md and "50.00%" in md
    assert "training time: 1m 35s" in md  # elapsed_s of the last training line: 95 s
    assert "steps: 200; epochs completed: 4" in md
    assert "images/s" in md and f"{c2['mean']:.3f}" in md


def test_eval_rows_final_and_best():
    def ev(split, t1, t5, epoch):
        return record("eval", split=split, ten_crop=False, step=epoch, epoch=epoch, top1_err=t1, top5_err=t5, images=8)

    evals = [ev("val", 0.6, 0.3, 1), ev("val", 0.5, 0.2, 2), ev("val", 0.55, 0.25, 3), ev("train", 0.1, 0.0, 3)]
    val, train = report.eval_rows(evals)
    assert (val.split, train.split) == ("val", "train")
    assert (val.final_top1, val.final_epoch) == (0.55, 3)
    assert (val.best_top1, val.best_top5, val.best_epoch) == (0.5, 0.2, 2)
    assert val.points == 3 and not val.ten_crop


def test_missing_checkpoint_still_reports(tmp_path):
    run = write_run(tmp_path / "run", with_checkpoint=False, preview=False)
    out = build_report(run, tmp_path / "out").out_dir
    assert (out / "curves.png").is_file() and (out / "report.md").is_file()
    assert not (out / "conv1_kernels.png").exists()
    md = (out / "report.md").read_text()
    assert "no checkpoint" in md and "no preview sheet" in md
    assert "90.00%" in md  # num_classes from config.json


# ---------------------------------------------------------------- CLI


def test_cli_report_prints_scores_and_writes_to_out(run_dir, tmp_path):
    sheet = tmp_path / "sheet.png"
    Image.new("RGB", (32, 32), (200, 0, 0)).save(sheet)
    r = CliRunner().invoke(_cli(), ["report", str(run_dir), "--out", str(tmp_path / "r"), "--preview", str(sheet)])
    assert r.exit_code == 0, r.output
    assert "conv1 colourfulness: column one 0.000, column two 0." in r.output
    assert "val centre crop: top-1 error 40.00%" in r.output
    assert "chance: top-1 error 90.00% (10 classes)" in r.output
    with Image.open(tmp_path / "r" / "preview.png") as im:
        assert im.size == (32, 32)  # the given sheet, not the run's own preview.png


def test_cli_help_has_examples():
    r = CliRunner().invoke(_cli(), ["report", "--help"])
    assert r.exit_code == 0 and "Examples:" in r.output and "--out" in r.output


EPOCH_END = json.dumps(record("epoch_end", epoch=1, step=5))
OLD_LINE = '{"kind": "train", "step": 10, "epoch": 0, "loss": 2.3, "lr": 0.01, "images_per_s": 50.0}\n'


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "run directory"),
        (lambda p: p.mkdir(), "no metrics.jsonl"),
        (lambda p: (p.mkdir(), (p / "metrics.jsonl").write_text(EPOCH_END + "\nnot json\n")), "metrics.jsonl:2"),
        (lambda p: (p.mkdir(), (p / "metrics.jsonl").write_text("\n")), "no metrics lines"),
        (lambda p: (p.mkdir(), (p / "metrics.jsonl").write_text(OLD_LINE)), "metrics.jsonl:1: a record of no schema"),
        (lambda p: (p.mkdir(), (p / "metrics.jsonl").write_text(EPOCH_END.replace("step", "stop"))), "without step"),
    ],
    ids=["missing-run-dir", "missing-metrics", "bad-line", "empty-metrics", "before-schemas", "missing-field"],
)
def test_cli_bad_input_is_one_clear_line(tmp_path, setup, message):
    run = tmp_path / "run"
    setup(run)
    r = CliRunner().invoke(_cli(), ["report", str(run)])
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.output
    assert "Traceback" not in r.output


def test_cli_unreadable_checkpoint_is_one_clear_line(tmp_path):
    run = write_run(tmp_path / "run", with_checkpoint=False, preview=False)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    r = CliRunner().invoke(_cli(), ["report", str(run)])
    assert r.exit_code == 1
    assert r.output.strip().startswith("error: cannot read checkpoint") and len(r.output.strip().splitlines()) == 1


# ---------------------------------------------------------------- the PIL plot helper


def test_nice_ticks():
    assert plots.nice_ticks(0, 100) == [0, 20, 40, 60, 80, 100]
    assert plots.nice_ticks(0.3, 2.4) == pytest.approx([0.5, 1.0, 1.5, 2.0])
    t = plots.nice_ticks(-3.2, 7.9)
    steps = np.diff(t)
    assert np.allclose(steps, steps[0]) and t[0] >= -3.2 and t[-1] <= 7.9
    assert plots.format_tick(0.001) == "0.001" and plots.format_tick(1e-4) == "1e-4"


def test_line_plot_skips_non_finite_and_handles_no_data():
    axes = plots.Axes("t", "x", "y", size=(320, 240))
    img = plots.line_plot([plots.Series("a", [0, 1, 2, 3], [1.0, float("nan"), float("inf"), 2.0])], axes)
    assert img.size == (320, 240)
    blank = plots.line_plot([plots.Series("a", [], [])], axes)
    assert blank.size == (320, 240)
    # A series in red shows up as red pixels; the empty plot has none.
    red = plots.line_plot([plots.Series("r", [0, 1], [0, 1], color=(255, 0, 0))], axes)
    arr = np.asarray(red).astype(int)
    assert ((arr[..., 0] > 200) & (arr[..., 1] < 60) & (arr[..., 2] < 60)).sum() > 50
    arr = np.asarray(blank).astype(int)
    assert ((arr[..., 0] > 200) & (arr[..., 1] < 60) & (arr[..., 2] < 60)).sum() == 0


def test_the_last_centre_crop_point_stays_visible_under_the_ten_patch_marker():
    """The demo's final centre-crop evaluation and its ten patches share an epoch and nearly an error: the
    ten patches' hollow marker must not hide the centre-crop point."""
    axes = plots.Axes("t", "epoch", "error (%)", ylim=(0.0, 100.0))
    blue, orange = (0, 0, 255), (255, 128, 0)
    centre = plots.Series("centre", [1, 2, 3], [60.0, 30.0, 38.0], color=blue, markers=True)
    ten = plots.Series("ten", [3], [39.0], color=orange, markers=True, dashed=True)

    def blue_at_the_end(img):
        arr = np.asarray(img)
        right = arr[:, int(arr.shape[1] * 0.9) :]
        return int((right == blue).all(axis=2).sum())

    alone, both = (
        blue_at_the_end(plots.line_plot([centre], axes)),
        blue_at_the_end(plots.line_plot([centre, ten], axes)),
    )
    assert alone > 40 and both >= 0.8 * alone, (alone, both)
    assert blue_at_the_end(plots.line_plot([ten, centre], axes)) >= 0.8 * alone  # whatever the order


# ---------------------------------------------------------------- a real run, evaluated afterwards


def test_evaluating_an_earlier_checkpoint_leaves_the_training_figures_alone(tmp_path):
    """Issue 28, tried as a new user: `eval` on an earlier checkpoint of a finished run used to append
    to metrics.jsonl, so that `report` gave that checkpoint's error as the final one ("at epoch 1") and
    the error plot drew a line back from the last epoch to it; the epoch count was one short. Now the
    evaluation goes to evals.jsonl, naming its checkpoint, dataset and split, and is listed apart."""
    from _train_fixtures import run_config, write_dataset

    from alexnet.trainer.cli import main
    from alexnet.trainer.train import train

    data = write_dataset(tmp_path / "data", num_classes=4, train_per_class=2, val_per_class=1)
    run = RunDir(tmp_path / "run")
    cfg = run_config(data, run.root, epochs=3, max_steps=0, keep_epochs=0)  # 2 steps an epoch
    assert train(cfg)["epochs_completed"] == 3
    history = run.metrics.read_bytes()
    early = run.epoch_checkpoint(1)
    args = ["eval", "--data-dir", str(data), "--gpus", "cpu", "--threads", "1", "--no-progress", "--batch-size", "4"]
    r = CliRunner().invoke(main, [*args, "--checkpoint", str(early)])
    assert r.exit_code == 0, r.output
    assert run.metrics.read_bytes() == history  # training's own log is untouched
    (posthoc,) = [json.loads(line) for line in run.evals.read_text().splitlines()]
    assert (posthoc["checkpoint"], posthoc["dataset"], posthoc["split"]) == (str(early), str(data), "val")
    assert (posthoc["kind"], posthoc["step"], posthoc["epoch"], posthoc["ten_crop"]) == ("checkpoint_eval", 2, 1, False)

    metrics = report.read_metrics(run)
    assert [e["epoch"] for e in metrics.evals] == [1, 2, 3]  # the error plot's points, in order
    res = build_report(run.root, tmp_path / "report")
    (row,) = res.rows
    last = metrics.evals[-1]
    assert (row.final_epoch, row.final_top1, row.points) == (3, last["top1_err"], 3)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "steps: 6; epochs completed: 3" in md
    assert f"| `{early}` | 2 | 1 | `{data}` | val | centre crop |" in md
