"""Resuming: a killed run resumed with the same command ends bitwise where an uninterrupted one did."""

from __future__ import annotations

import pytest
import torch
from _train_fixtures import KILL_AT, STEPS, metrics_lines, run_config, train_watched
from click.testing import CliRunner

from alexnet.trainer import checkpoint as ckpt_io


def test_killed_and_resumed_equals_uninterrupted(uninterrupted, killed_and_resumed):
    (run_a, sa), (run_b, sb, killed_ck) = uninterrupted, killed_and_resumed
    assert (killed_ck["step"], killed_ck["batch_in_epoch"]) == (3, 3)  # resumed from mid-epoch
    assert sa["steps"] == sb["steps"] == STEPS
    a = ckpt_io.load_checkpoint(run_a / "checkpoints" / "last.pt")
    b = ckpt_io.load_checkpoint(run_b / "checkpoints" / "last.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k  # bitwise on the CPU
    for sa_, sb_ in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(sa_["velocity"], sb_["velocity"])
    # same seed, same losses, step by step (the killed run's lines after its checkpoint were dropped)
    la = [(x["step"], x["loss"]) for x in metrics_lines(run_a) if x["kind"] == "train"]
    lb = [(x["step"], x["loss"]) for x in metrics_lines(run_b) if x["kind"] == "train"]
    assert la == lb and len(la) == STEPS


def test_resume_with_region_decoding_continues_the_epoch(train_data, tmp_path, capsys):
    """The loader's position is (epoch, records consumed, seed), not a DALI graph's state: a resume
    with --roi-decode (another DALI graph) continues the epoch where the killed run stopped."""
    from alexnet.trainer.train import train

    class Killed(Exception):
        pass

    def crash(step, epoch, labels):
        if step == KILL_AT:
            raise Killed

    run = tmp_path / "run"
    with pytest.raises(Killed):
        train_watched(run_config(train_data, run, checkpoint_every_steps=3), on_step=crash)
    summary = train(run_config(train_data, run, resume=True, roi_decode=True))
    err = capsys.readouterr()
    assert "restarts" not in err.out + err.err and "(epoch 0, +3 batches)" in err.out + err.err
    assert summary["steps"] == STEPS and summary["stop_reason"] == "max_steps"


def test_cli_resume_without_a_checkpoint_starts_the_run(train_data, tmp_path):
    """A requeued job always passes --resume: before any checkpoint exists it starts the run, saying so."""
    from alexnet.trainer.cli import main

    run = tmp_path / "run"
    base = ["--data-dir", str(train_data), "--run-dir", str(run)]
    base += "--gpus cpu --no-progress --batch-size 4 --epochs 0 --max-steps 2 --threads 1 --resume".split()
    r = CliRunner().invoke(main, base)
    assert r.exit_code == 0, r.output
    assert "nothing to resume" in r.output and "starting the run" in r.output
    assert ckpt_io.load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 2
    r = CliRunner().invoke(main, [*base[:-4], "4", "--threads", "1", "--resume"])  # now it resumes
    assert r.exit_code == 0 and "resuming at step 2" in r.output
    assert ckpt_io.load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 4
