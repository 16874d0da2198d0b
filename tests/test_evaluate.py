"""Evaluation: §4.1's ten-patch softmax average, top-k counts, and ``alexnet-train eval`` on a real run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _train_fixtures import STEPS, run_config
from click.testing import CliRunner

from alexnet.pipeline import constants as C
from alexnet.trainer import checkpoint as ckpt_io
from alexnet.trainer.distributed import DistInfo
from alexnet.trainer.evaluate import average_patch_softmax, topk_counts
from alexnet.trainer.rundir import RunDir, read_log


def test_ten_patch_average_of_softmax_on_known_input():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2 * C.TEN_CROP, 6)) * 3
    probs = average_patch_softmax(torch.tensor(logits), C.TEN_CROP).numpy()
    e = np.exp(logits - logits.max(1, keepdims=True))
    ref = (e / e.sum(1, keepdims=True)).reshape(2, C.TEN_CROP, 6).mean(1)
    np.testing.assert_allclose(probs, ref, rtol=1e-6)
    # averaging softmax outputs is not averaging logits: a case where the two disagree
    one = np.zeros((C.TEN_CROP, 2))
    one[0] = [100.0, 0.0]  # one very confident patch for class 0
    one[1:, 1] = 1.0  # nine mildly confident patches for class 1
    assert one.mean(0).argmax() == 0
    assert average_patch_softmax(torch.tensor(one), C.TEN_CROP).argmax(1).item() == 1


def test_topk_counts():
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0, 0.0], [0.5, 0.2, 0.1, 0.08, 0.07, 0.05]])
    assert topk_counts(probs, torch.tensor([3, 5])).tolist() == [1, 1]  # class 5 is 6th in row 2
    assert topk_counts(probs, torch.tensor([0, 0])).tolist() == [1, 2]


def test_eval_only_ten_crop_cli_prints_and_logs_both(uninterrupted, train_data, tmp_path):
    from alexnet.trainer.cli import main

    run, _ = uninterrupted
    ck = tmp_path / "copy.pt"
    ck.write_bytes((run / "checkpoints" / "last.pt").read_bytes())
    r = CliRunner().invoke(
        main,
        [
            "eval",
            "--data-dir",
            str(train_data),
            "--run-dir",
            str(tmp_path / "eval"),
            *"--gpus cpu --batch-size 4 --threads 1 --no-progress --ten-crop --checkpoint".split(),
            str(ck),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "centre crop" in r.output and "ten patches" in r.output
    evals = read_log(RunDir(tmp_path / "eval").evals)
    assert [x["ten_crop"] for x in evals] == [False, True] and all(x["images"] == 8 for x in evals)
    assert all(x["step"] == STEPS and x["checkpoint"] == str(ck) for x in evals)
    assert not RunDir(tmp_path / "eval").metrics.exists()  # training's log is not the evaluations' place


def test_evaluate_ten_crop_matches_a_direct_computation(uninterrupted, train_data):
    """evaluate(ten_crop=True) against the same batches scored by hand (numpy softmax average)."""
    from alexnet.trainer.evaluate import evaluate
    from alexnet.trainer.model import AlexNet
    from alexnet.trainer.replica import create_loader_for, resolve_replica

    run, _ = uninterrupted
    model = AlexNet.from_state_dict(ckpt_io.load_checkpoint(run / "checkpoints" / "last.pt")["model"])
    cfg = run_config(train_data, run)

    loader = create_loader_for(cfg, "val", resolve_replica("cpu", DistInfo()), ten_crop=True, batch_size=3)
    res = evaluate(model, loader, ten_crop=True)
    model.eval()
    correct1 = correct5 = n = 0
    with torch.no_grad():
        for images, labels in loader:  # a second val epoch: the same batches in the same order
            assert tuple(images.shape[1:]) == (C.TEN_CROP, 3, C.CROP_SIZE, C.CROP_SIZE)
            logits = model(images.reshape(-1, 3, C.CROP_SIZE, C.CROP_SIZE)).double().numpy()
            e = np.exp(logits - logits.max(1, keepdims=True))
            p = (e / e.sum(1, keepdims=True)).reshape(images.shape[0], C.TEN_CROP, -1).mean(1)
            order = np.argsort(-p, axis=1)
            lab = labels.reshape(-1).numpy()
            correct1 += int((order[:, 0] == lab).sum())
            correct5 += int((order[:, :4] == lab[:, None]).any(1).sum())  # 4 classes: top-5 = all
            n += len(lab)
    assert n == res["images"] == 8
    assert res["top1_err"] == pytest.approx(1 - correct1 / n) and res["top5_err"] == pytest.approx(1 - correct5 / n)
