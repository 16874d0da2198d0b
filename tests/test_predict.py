"""predict and export on a real (tiny) trained run: numpy references, the evaluation's ten patches,
the JSON output, bad inputs, and the exported file loaded by plain PyTorch in a clean process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from alexnet.pipeline import artifacts as A
from alexnet.pipeline import constants as C
from alexnet.pipeline.errors import AlexnetError
from alexnet.trainer import checkpoint as ckpt_io
from alexnet.trainer.config import TrainConfig
from alexnet.trainer.evaluate import average_patch_softmax
from alexnet.trainer.predict import load_predictor, patches, predict, stored_crop

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A dataset and a checkpoint after 3 training steps (the checkpoint carries classes and mean)."""
    from _train_fixtures import trained_run

    return trained_run(tmp_path_factory.mktemp("predict"))


@pytest.fixture(scope="module")
def val_files(run, tmp_path_factory):
    """Each val record's stored JPEG written to a file: {record position: path}."""
    data, _ = run
    out = tmp_path_factory.mktemp("val_files")
    files = {}
    for key, datum in A.iter_records(data, "val"):
        position, _ = A.parse_key(key)
        files[position] = out / f"{position}.jpg"
        files[position].write_bytes(datum.data)
    return files


def _photo(path: Path, size=(300, 200), seed=0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=92)
    return path


def test_predict_is_the_models_forward_pass_on_the_papers_preprocessing(run, tmp_path):
    data, ckpt = run
    pred = load_predictor(ckpt, torch.device("cpu"))  # the checkpoint carries classes and mean
    assert pred.classes == A.read_manifest(data).classes
    np.testing.assert_array_equal(pred.mean_image, A.read_mean_image(data))
    path = _photo(tmp_path / "a.jpg")
    image = stored_crop(path)
    assert image.shape == (256, 256, 3)
    # numpy reference of the centre patch: (image - mean) at rows/columns 16..239, CHW
    ref = (image - pred.mean_image)[16:240, 16:240].transpose(2, 0, 1)
    np.testing.assert_array_equal(patches(image, pred.mean_image, False)[0], ref)
    with torch.no_grad():
        expected = torch.softmax(pred.model(torch.from_numpy(ref[None].copy())), dim=1)[0]
    (rec,) = list(predict(pred, [path], ten_crop=False, batch_size=4))
    assert [t["wnid"] for t in rec["top5"]] == [pred.classes[i] for i in expected.argsort(descending=True)[:4]]
    for t in rec["top5"]:
        assert t["prob"] == pytest.approx(expected[pred.classes.index(t["wnid"])].item(), abs=1e-6)


def test_ten_crop_prediction_equals_the_evaluations_ten_patches(run, val_files):
    """The evaluation pipeline's ten patches (DALI) of each val record against predict's ten patches of
    the same stored JPEG: the same cuts in the same order (up to the two decoders' pixels), and the
    same averaged softmax."""
    from alexnet.pipeline.loader import DataConfig, create_loader

    data, ckpt = run
    pred = load_predictor(ckpt, torch.device("cpu"))
    loader = create_loader(data, "val", DataConfig(num_threads=1), batch_size=4, ten_crop=True, with_draws=True)
    seen = 0
    for images, _labels, draws in loader:
        with torch.no_grad():
            eval_probs = average_patch_softmax(pred.model(images.flatten(0, 1)), C.TEN_CROP)
        for row, position in enumerate(draws["index"].tolist()):
            mine = patches(stored_crop(val_files[position]), pred.mean_image, True)
            diff = np.abs(mine - images[row].numpy())
            assert diff.mean() < 1.0, (position, diff.mean())  # a wrong cut or order is tens of levels off
            (rec,) = list(predict(pred, [val_files[position]], ten_crop=True, batch_size=1))
            for t in rec["top5"]:
                assert t["prob"] == pytest.approx(eval_probs[row, pred.classes.index(t["wnid"])].item(), abs=2e-3)
            seen += 1
    assert seen == len(val_files) == 8


def test_cli_json_lines_parse_and_bad_files_get_one_line_each(run, tmp_path):
    from alexnet.trainer.cli import main

    _, ckpt = run
    good = _photo(tmp_path / "good.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    args = [
        "predict",
        "--checkpoint",
        str(ckpt),
        "--gpus",
        "cpu",
        "--json",
        str(good),
        str(tmp_path / "notes.txt"),
        str(tmp_path / "missing.jpg"),
    ]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1, r.output  # some files failed; the others were predicted
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [Path(x["path"]).name for x in lines] == ["good.jpg", "notes.txt", "missing.jpg"]
    assert len(lines[0]["top5"]) == 4 and abs(sum(t["prob"] for t in lines[0]["top5"]) - 1) < 1e-5
    assert "not an image" in lines[1]["error"] and "cannot read" in lines[2]["error"]
    r = CliRunner().invoke(main, ["predict", "--checkpoint", str(ckpt), "--gpus", "cpu", str(good)])
    assert r.exit_code == 0 and "good.jpg" in r.output and "%" in r.output


def test_checkpoint_with_another_class_count_is_one_line(run, tmp_path):
    from alexnet.trainer.cli import main

    _, ckpt = run
    ck = ckpt_io.load_checkpoint(ckpt)
    ck["dataset"]["classes"] = ck["dataset"]["classes"][:3]
    bad = tmp_path / "bad.pt"
    ckpt_io.save_checkpoint(bad, ck)
    with pytest.raises(AlexnetError, match="4 output classes but its class list has 3"):
        load_predictor(bad, torch.device("cpu"))
    r = CliRunner().invoke(
        main, ["predict", "--checkpoint", str(bad), "--gpus", "cpu", str(_photo(tmp_path / "x.jpg"))]
    )
    assert r.exit_code != 0 and "Traceback" not in r.output and "class list has 3" in r.output
    ck["dataset"] = None  # a checkpoint not written by training: refused, there is no --data-dir to fall back on
    ckpt_io.save_checkpoint(bad, ck)
    with pytest.raises(AlexnetError, match="carries no class list or mean image"):
        load_predictor(bad, torch.device("cpu"))


CLEAN_LOAD = r"""
import sys
root = sys.argv[1]
sys.path = [p for p in sys.path if p not in ("", ".") and "__editable__" not in p
            and not (p.startswith(root) and "site-packages" not in p)]
sys.meta_path = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path_importer_cache.clear()
try:
    import alexnet  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("the project is importable: the check would prove nothing")
import base64, io, json
import numpy as np
import torch
extra = {"alexnet.json": ""}
program = torch.export.load(sys.argv[2], extra_files=extra)
meta = json.loads(extra["alexnet.json"])
mean = np.load(io.BytesIO(base64.b64decode(meta["mean_image_npy_b64"])))
batch = torch.load(sys.argv[3])
out = program.module()(batch)
torch.save({"probs": out, "classes": meta["classes"], "mean": torch.from_numpy(mean),
            "crop": meta["crop_size"]}, sys.argv[4])
"""


def test_export_runs_in_plain_pytorch_without_the_package(run, tmp_path):
    from alexnet.trainer.cli import main

    _, ckpt = run
    out = tmp_path / "alexnet.pt2"
    r = CliRunner().invoke(main, ["export", "--checkpoint", str(ckpt), "--out", str(out)])
    assert r.exit_code == 0, r.output
    pred = load_predictor(ckpt, torch.device("cpu"))
    batch = torch.randn(3, 3, C.CROP_SIZE, C.CROP_SIZE, generator=torch.Generator().manual_seed(0)) * 50
    torch.save(batch, tmp_path / "batch.pt")
    script = tmp_path / "load.py"
    script.write_text(CLEAN_LOAD)
    res = subprocess.run(
        [sys.executable, str(script), str(ROOT), str(out), str(tmp_path / "batch.pt"), str(tmp_path / "out.pt")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    got = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        expected = torch.softmax(pred.model(batch), dim=1)
    torch.testing.assert_close(got["probs"], expected, rtol=0, atol=1e-5)
    assert got["classes"] == pred.classes and got["crop"] == C.CROP_SIZE
    np.testing.assert_array_equal(got["mean"].numpy(), pred.mean_image)


def _readme_export_snippet() -> str:
    """The README's snippet that uses an exported file (the python block after "runs without this package")."""
    text = (ROOT / "README.md").read_text()
    start = text.index("```python", text.index("The exported file runs without this package"))
    return text[start + len("```python") : text.index("```", start + 3)]


def test_the_readmes_export_snippet_predicts_what_predict_does(run, tmp_path):
    """The README's whole use of an exported file, run as written (file names swapped) in a process that
    cannot import this package: its probabilities are predict's centre crop of the same photo."""
    from alexnet.trainer.cli import main

    _, ckpt = run
    out, photo = tmp_path / "alexnet.pt2", _photo(tmp_path / "photo.jpg", size=(300, 200), seed=3)
    assert CliRunner().invoke(main, ["export", "--checkpoint", str(ckpt), "--out", str(out)]).exit_code == 0
    snippet = _readme_export_snippet()
    assert all(part in snippet for part in ("torch.no_grad()", "extra_files", '"demo/alexnet.pt2"', ".topk(5)"))
    code = snippet.replace('"demo/alexnet.pt2"', repr(str(out))).replace('"photo.jpg"', repr(str(photo)))
    code = code.replace(".topk(5)", ".topk(4)")  # the test's network has 4 classes
    guard = CLEAN_LOAD[: CLEAN_LOAD.index("import base64")]  # the clean sys.path of the test above
    script = tmp_path / "snippet.py"
    script.write_text(guard + code + f"\ntorch.save(probs, {str(tmp_path / 'probs.pt')!r})\n")
    res = subprocess.run([sys.executable, str(script), str(ROOT)], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    pred = load_predictor(ckpt, torch.device("cpu"))
    (expected,) = predict(pred, [photo], ten_crop=False, batch_size=1)
    printed = [line.split() for line in res.stdout.strip().splitlines()]
    assert [p[1] for p in printed] == [t["wnid"] for t in expected["top5"]][: len(printed)]
    probs = torch.load(tmp_path / "probs.pt")[0]
    top = [t["prob"] for t in expected["top5"]]
    # ImageOps.fit's window differs from the builder's by under a pixel: the same probabilities to 1e-3.
    np.testing.assert_allclose(probs.topk(len(top)).values.numpy(), top, atol=1e-3)


def test_nearest_neighbours_equal_a_numpy_brute_force():
    from alexnet.trainer.figure4 import nearest

    rng = np.random.default_rng(0)
    pool, queries = rng.normal(size=(40, 16)), rng.normal(size=(5, 16))
    d = ((queries[:, None, :] - pool[None, :, :]) ** 2).sum(-1)  # squared Euclidean, by hand
    expected = np.argsort(d, axis=1, kind="stable")[:, :6]
    got = nearest(torch.from_numpy(queries).float(), torch.from_numpy(pool).float()).numpy()
    np.testing.assert_array_equal(got, expected)


def test_report_draws_both_figure4_panels_and_the_class_table(run, tmp_path):
    from PIL import Image

    from alexnet.trainer.figure4 import run_split
    from alexnet.trainer.report import build_report

    data, ckpt = run
    res = build_report(ckpt.parent.parent, tmp_path / "report")
    for name in ("figure4_predictions", "figure4_neighbours"):
        with Image.open(res.images[name]) as im:
            assert im.width > 300 and im.height > 150
    f = res.figure4
    assert f["val_images"] == 8 and f["train_searched"] == 16
    md = (tmp_path / "report" / "report.md").read_text()
    assert "figure4_neighbours.png" in md and "| class | name | images | top-1 error |" in md
    # the table's errors are the centre-crop argmax errors of the same sample
    pred = load_predictor(ckpt, torch.device("cpu"))
    val = run_split(pred, data, "val", 1000)
    wrong = (val.probs.argmax(1).numpy() != val.labels).mean()
    assert np.isclose(sum(n * e for _, _, n, e in f["class_errors"]) / 8, wrong)


def test_a_run_trained_with_the_channel_mean_carries_it(run, tmp_path):
    """--mean channel: the checkpoint's mean image is the per-channel mean everywhere, so predict and
    export subtract what the training pipeline subtracted."""
    from _train_fixtures import train_tiny

    data, _ = run
    ckpt = train_tiny(data, tmp_path / "run", max_steps=1, mean="channel")
    mean = ckpt_io.load_checkpoint(ckpt)["dataset"]["mean_image"].numpy()
    expected = np.broadcast_to(np.asarray(A.read_stats(data).mean_rgb, dtype=np.float32), (256, 256, 3))
    np.testing.assert_array_equal(mean, expected)
    assert not np.allclose(mean, A.read_mean_image(data))  # not the mean image


def test_report_without_a_val_split_leaves_figure4_out_with_a_note(run, tmp_path):
    import shutil

    from alexnet.trainer.report import build_report

    data, ckpt = run
    train_only = tmp_path / "data"
    shutil.copytree(data, train_only)
    manifest = json.loads((train_only / "manifest.json").read_text())
    del manifest["splits"]["val"]
    (train_only / "manifest.json").write_text(json.dumps(manifest))
    run_dir = tmp_path / "run"
    shutil.copytree(ckpt.parent.parent, run_dir)
    saved = TrainConfig.load(run_dir / "config.json")
    saved.replace(data_dir=str(train_only)).save(run_dir / "config.json")
    res = build_report(run_dir, tmp_path / "report")
    assert res.figure4 is None and "figure4_predictions" not in res.images
    assert any("Figure 4" in n and "left out" in n for n in res.notes)


# ---------------------------------------------------------------- the checkpoint decides; §6's averaged CNNs


@pytest.fixture(scope="module")
def channel_ckpt(run, tmp_path_factory):
    """A second checkpoint of the same dataset, trained with --mean channel (another seed)."""
    from alexnet.trainer.train import train

    data, _ = run
    base = tmp_path_factory.mktemp("channel")
    cfg = TrainConfig.create(
        data_dir=str(data),
        run_dir=str(base / "run"),
        gpus="cpu",
        batch_size=4,
        epochs=0,
        max_steps=3,
        lr=1e-3,
        num_threads=1,
        progress=False,
        checkpoint_minutes=0.0,
        mean="channel",
        seed=1,
    )
    train(cfg)
    return base / "run" / "checkpoints" / "last.pt"


def _val_loader(data, mean: str, ten_crop: bool = False):
    from alexnet.pipeline.loader import DataConfig, create_loader

    return create_loader(data, "val", DataConfig(num_threads=1, mean=mean), batch_size=4, ten_crop=ten_crop)


def _eval_cli(data, *ckpts, extra=()):
    from alexnet.trainer.cli import main

    args = [
        "eval",
        "--data-dir",
        str(data),
        "--gpus",
        "cpu",
        "--batch-size",
        "4",
        "--threads",
        "1",
        "--no-progress",
        *extra,
    ]
    for c in ckpts:
        args += ["--checkpoint", str(c)]
    return CliRunner().invoke(main, args)


def _printed_top1(output: str) -> float:
    line = next(x for x in output.splitlines() if "centre crop" in x)
    return float(line.split("top-1 error")[1].split("%")[0])


def test_eval_takes_the_mean_from_the_checkpoint_and_refuses_another(run, channel_ckpt):
    from alexnet.trainer.evaluate import evaluate

    data, _ = run
    model = load_predictor(channel_ckpt, torch.device("cpu")).model
    expected = evaluate(model, _val_loader(data, "channel"))["top1_err"]
    r = _eval_cli(data, channel_ckpt)  # no --mean: the checkpoint's 'channel'
    assert r.exit_code == 0, r.output
    assert _printed_top1(r.output) == pytest.approx(100 * expected, abs=0.01)
    r = _eval_cli(data, channel_ckpt, extra=["--mean", "image"])
    assert r.exit_code == 1 and "trained with --mean channel, not image" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1


def test_averaged_probabilities_are_the_mean_of_each_models_own(run, channel_ckpt, val_files):
    """§6: each model on its own mean image; the average equals the models' own softmax outputs averaged,
    and the average of one model is that model."""
    from alexnet.trainer.predict import average_probabilities, load_predictors

    _, ckpt = run
    preds = load_predictors([ckpt, channel_ckpt], torch.device("cpu"))
    assert not np.allclose(preds[0].mean_image, preds[1].mean_image)
    images = [stored_crop(p) for p in list(val_files.values())[:3]]
    for ten in (False, True):
        own = []
        for p in preds:  # by hand: each model's patches on its own mean, softmax, the patches' mean
            x = torch.from_numpy(np.concatenate([patches(im, p.mean_image, ten) for im in images]))
            with torch.no_grad():
                own.append(torch.softmax(p.model(x), dim=1).view(len(images), -1, 4).mean(dim=1))
        torch.testing.assert_close(average_probabilities(preds, images, ten), (own[0] + own[1]) / 2)
        torch.testing.assert_close(average_probabilities(preds[:1], images, ten), own[0])


def test_eval_of_averaged_checkpoints_equals_a_direct_computation(run, channel_ckpt):
    from alexnet.trainer.evaluate import evaluate, evaluate_average, topk_counts

    data, ckpt = run
    models = [load_predictor(c, torch.device("cpu")).model for c in (ckpt, channel_ckpt)]
    c1 = seen = 0
    for (a, labels), (b, _) in zip(_val_loader(data, "image"), _val_loader(data, "channel"), strict=True):
        with torch.no_grad():
            probs = (torch.softmax(models[0](a), 1) + torch.softmax(models[1](b), 1)) / 2
        c1 += int(topk_counts(probs, labels)[0])
        seen += len(labels)
    r = _eval_cli(data, ckpt, channel_ckpt)
    assert r.exit_code == 0, r.output
    assert "average of 2 checkpoints" in r.output
    assert _printed_top1(r.output) == pytest.approx(100 * (1 - c1 / seen), abs=0.01)
    one = evaluate(models[0], _val_loader(data, "image"))
    assert evaluate_average([(models[:1], _val_loader(data, "image"))]) == one
    r = _eval_cli(data, ckpt, ckpt)  # the same model twice averages to itself
    assert _printed_top1(r.output) == pytest.approx(100 * one["top1_err"], abs=0.01)


def test_checkpoints_of_other_classes_are_not_averaged(run, tmp_path):
    from alexnet.trainer.cli import main

    _, ckpt = run
    ck = ckpt_io.load_checkpoint(ckpt)
    ck["dataset"]["classes"] = list(reversed(ck["dataset"]["classes"]))
    other = tmp_path / "other.pt"
    ckpt_io.save_checkpoint(other, ck)
    r = CliRunner().invoke(
        main,
        [
            "predict",
            "--checkpoint",
            str(ckpt),
            "--checkpoint",
            str(other),
            "--gpus",
            "cpu",
            str(_photo(tmp_path / "x.jpg")),
        ],
    )
    assert r.exit_code == 1 and "other classes" in r.output and len(r.output.strip().splitlines()) == 1, r.output


def _png_bomb(path: Path, side: int = 30000) -> Path:
    """A PNG header claiming side x side pixels (over PIL's decompression-bomb limit) in a few bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )
    return path


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory):
    """Image files of every awkward mode, each with the RGB image it must be read as (the reference)."""
    from PIL import Image

    d = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    wide = (np.linspace(0, 65535, 90 * 120).reshape(90, 120) + rng.integers(0, 200, (90, 120))).clip(0, 65535)
    wide = wide.astype(np.uint16)
    grey8 = np.rint(wide * (255 / 65535)).astype(np.uint8)  # the numpy reference of the 16-bit scaling
    alpha = rng.integers(0, 256, (90, 120, 1), dtype=np.uint8)
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    cases = {
        "grey16.png": (Image.fromarray(wide), np.repeat(grey8[..., None], 3, axis=2)),
        "rgba.png": (Image.fromarray(np.concatenate([rgb, alpha], axis=2), "RGBA"), rgb),
        "palette.png": (palette, np.asarray(palette.convert("RGB"))),
        "grey.png": (Image.fromarray(rgb[..., 0]), np.repeat(rgb[..., :1], 3, axis=2)),
        "one-pixel.png": (Image.fromarray(rgb[:1, :1]), rgb[:1, :1]),
    }
    out = {}
    for name, (im, ref) in cases.items():
        im.save(d / name)
        out[name] = ref
    Image.fromarray(rgb).convert("CMYK").save(d / "cmyk.jpg", quality=95)
    out["cmyk.jpg"] = np.asarray(Image.open(d / "cmyk.jpg").convert("RGB"))
    return d, out


def test_every_image_mode_is_read_as_its_rgb_reference(odd_images):
    """16-bit greyscale scaled (not clipped), RGBA, palette, grey, CMYK and a 1x1 image: the stored crop
    equals the crop of the reference RGB image (numpy scaling for 16 bits)."""
    from PIL import Image

    from alexnet.pipeline.images import resize_centre_crop

    d, refs = odd_images
    assert Image.open(d / "grey16.png").mode == "I;16"  # the mode PIL would clip
    for name, ref in refs.items():
        want = np.asarray(resize_centre_crop(Image.fromarray(ref)), dtype=np.float32)
        np.testing.assert_array_equal(stored_crop(d / name), want, err_msg=name)
    assert stored_crop(d / "grey16.png").mean() < 200  # not saturated (PIL's convert gives 99.6% at 255)


def test_bad_image_files_get_one_line_each_and_the_rest_are_predicted(run, odd_images, tmp_path):
    from alexnet.trainer.cli import main

    _, ckpt = run
    d, refs = odd_images
    good = _photo(tmp_path / "good.jpg")
    (tmp_path / "trunc.jpg").write_bytes(good.read_bytes()[:400])
    (tmp_path / "empty.png").write_bytes(b"")
    bad = [tmp_path / "trunc.jpg", tmp_path / "empty.png", _png_bomb(tmp_path / "bomb.png")]
    files = [d / name for name in refs] + bad
    r = CliRunner().invoke(main, ["predict", "--checkpoint", str(ckpt), "--gpus", "cpu", *map(str, files)])
    assert r.exit_code == 1, r.output  # some failed
    errors = [line for line in r.stderr.splitlines() if ": error: " in line]
    assert [line.split(": error: ")[0] for line in errors] == [str(p) for p in bad], r.stderr
    for line, why in zip(errors, ("truncated", "zero-byte file", "too large"), strict=True):
        assert why in line, line
    predicted = [line for line in r.stdout.splitlines() if not line.startswith(" ")]
    assert predicted == [str(d / name) for name in refs]  # every other file, in order
    r = CliRunner().invoke(main, ["predict", "--checkpoint", str(ckpt), "--gpus", "cpu", str(d)])
    assert r.exit_code == 0, r.output  # none failed
