"""When a run stops: signals (in process, from outside, twice) and non-finite values, each with its checkpoint."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from _train_fixtures import metrics_lines, run_config, train_recording, train_watched
from click.testing import CliRunner

from alexnet.trainer import checkpoint as ckpt_io
from alexnet.trainer.config import TrainConfig


def test_sigterm_mid_epoch_then_resume_equals_uninterrupted(train_data, uninterrupted, tmp_path):
    """A real SIGTERM to this process at step 2 (mid-epoch): the run finishes that step, writes last.pt
    with the loader's position and stops; --resume then ends bitwise where the uninterrupted run did."""
    import signal

    from alexnet.trainer.train import train

    def term(step, epoch, labels):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    run = tmp_path / "run"
    first, _ = train_watched(run_config(train_data, run), on_step=term)
    assert (first["stop_reason"], first["signal"], first["steps"]) == ("signal", "SIGTERM", 2)
    ck = ckpt_io.load_checkpoint(run / "checkpoints" / "last.pt")
    assert (ck["step"], ck["batch_in_epoch"], ck["reason"]) == (2, 2, "signal")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored after the run
    train(run_config(train_data, run, resume=True))
    a = ckpt_io.load_checkpoint(uninterrupted[0] / "checkpoints" / "last.pt")["model"]
    b = ckpt_io.load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _cli_after_its_first_step(train_data, run):
    """alexnet-train as its own process (a long run), returned once it has logged a training step."""
    import subprocess
    import sys
    import time

    args = [
        sys.executable,
        "-m",
        "alexnet.trainer.cli",
        "--data-dir",
        str(train_data),
        "--run-dir",
        str(run),
        *"--gpus cpu --batch-size 4 --epochs 0 --max-steps 1000 --lr 0.001 --log-every-steps 1 --threads 1 --no-progress --checkpoint-minutes 0".split(),
    ]
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and '"kind": "train"' in metrics.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    return proc


def test_cli_sigterm_from_outside_checkpoints_and_exits_143(train_data, tmp_path):
    """alexnet-train as its own process, SIGTERM sent from outside once it has trained a step: status
    143 (128 + 15), and the checkpoint holds the last step it logged."""
    import signal

    run = tmp_path / "run"
    proc = _cli_after_its_first_step(train_data, run)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, out + err
    assert "SIGTERM received" in err and "Traceback" not in err
    ck = ckpt_io.load_checkpoint(run / "checkpoints" / "last.pt")
    logged = [x["step"] for x in metrics_lines(run) if x["kind"] == "train"]
    assert ck["step"] == logged[-1] >= 1 and ck["reason"] == "signal"


STOP_SIGNALS_SCRIPT = r"""
import os, signal, time
from alexnet.trainer.stop import REPEAT_WINDOW_S, StopSignals
with StopSignals() as s:
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)  # a launcher's forwarded copy: the same event
    print("first:", s.received, flush=True)
    time.sleep(REPEAT_WINDOW_S + 0.2)
    os.kill(os.getpid(), signal.SIGINT)  # a real second signal: exits at once
    time.sleep(5)
    print("still running", flush=True)
"""


def test_second_signal_exits_at_once_and_a_forwarded_copy_does_not():
    """Real signals to a real process: a copy within the repeat window is the same event; a second
    signal after it exits at once with 128 + its number, without running any more code."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", STOP_SIGNALS_SCRIPT], capture_output=True, text=True, timeout=60)
    assert r.returncode == 130, r.stdout + r.stderr
    assert r.stdout == "first: SIGTERM\n"
    assert r.stderr.count("SIGTERM received") == 1 and "SIGINT again: exiting now" in r.stderr


def test_non_finite_loss_stops_with_one_line_and_keeps_last_good_checkpoint(train_data, tmp_path):
    from alexnet.trainer.cli import main

    run = tmp_path / "run"
    args = ["--data-dir", str(train_data), "--run-dir", str(run)]
    args += "--gpus cpu --batch-size 4 --max-steps 6 --lr 1e6 --log-every-steps 1 --checkpoint-every-steps 1 --threads 1 --no-progress".split()
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1, r.output
    err = [x for x in r.output.splitlines() if x.startswith("error:")]
    assert len(err) == 1 and "loss became" in err[0] and "Traceback" not in r.output
    ck = ckpt_io.load_checkpoint(run / "checkpoints" / "last.pt")
    assert 1 <= ck["step"] < 6
    assert all(torch.isfinite(t).all() for t in ck["model"].values())


@pytest.mark.parametrize(
    ("poison_at", "message"),
    [
        (4, "the loss became nan between steps 4 and 6"),
        (6, "the weights or their gradients became non-finite by step 6"),
    ],
)
def test_a_late_non_finite_check_never_writes_a_checkpoint_from_non_finite_weights(
    train_data, tmp_path, monkeypatch, poison_at, message
):
    """A NaN weight after step 4 (the loss turns NaN at step 5) or after step 6 (the loss of steps 4-6 is
    still finite): the checkpoint due at step 6 reads the interval first and stops without writing;
    last.pt stays step 3's, with finite weights."""
    from alexnet.trainer.stop import NonFiniteLoss

    run = tmp_path / "run"
    cfg = run_config(train_data, run, batch_size=2, max_steps=8, log_every_steps=3, checkpoint_every_steps=3)
    train, rec = train_recording(monkeypatch, poison_at=poison_at)
    with pytest.raises(NonFiniteLoss, match=message):
        train(cfg)
    ck = ckpt_io.load_checkpoint(run / "checkpoints" / "last.pt")
    assert ck["step"] == 3 and all(torch.isfinite(t).all() for t in ck["model"].values())
    assert [x["step"] for x in metrics_lines(run) if x["kind"] == "train"] == [3]
    assert math.isnan(rec["losses"][5]) == (poison_at == 4)


def test_stop_policy_decides_by_named_flags():
    """One process, real policy: the checkpoint interval and the time limit count at log points; a
    signal stops one process after its step, and waits for a log point where several replicas agree;
    a non-finite read stops the run in one line."""
    import time

    from alexnet.trainer.distributed import DistInfo
    from alexnet.trainer.stop import IntervalRead, NonFiniteLoss, StepDecision, StopPolicy, StopSignals

    def policy(info=None, **kw):
        run = TrainConfig.create(max_steps=10, **kw).run
        signals = StopSignals()
        return StopPolicy(run, signals, info or DistInfo(), time.monotonic(), Path("none/last.pt"), 0), signals

    finite = IntervalRead(loss=1.0, first=1, last=3, finite=True)
    p, _ = policy()
    assert p.after_step(3, True, finite) == p.after_step(3, False) == StepDecision(checkpoint=False, stop="")
    assert p.after_step(10, False).stop == "max_steps" and p.at_epoch_end() == ""
    p, _ = policy(checkpoint_minutes=1.0)
    p.last_checkpoint -= 61
    assert p.after_step(3, True, finite).checkpoint and not p.after_step(3, False).checkpoint
    p, _ = policy(time_limit_minutes=1.0)
    p.t0 -= 61
    assert p.after_step(3, True, None).stop == p.at_epoch_end() == "time_limit"
    assert p.after_step(3, False).stop == ""  # between log points the clock is not read
    p, signals = policy()
    signals.received = "SIGTERM"
    assert p.after_step(3, False).stop == p.after_step(3, True, finite).stop == p.at_epoch_end() == "signal"
    p, signals = policy(DistInfo(rank=0, world_size=2, local_rank=0, local_world_size=2))
    signals.received = "SIGTERM"
    assert p.after_step(3, False).stop == ""  # several replicas: it waits for the next agreement
    p, _ = policy()
    with pytest.raises(NonFiniteLoss, match="the loss became nan between steps 1 and 3"):
        p.after_step(3, True, IntervalRead(loss=float("nan"), first=1, last=3, finite=False))
    with pytest.raises(NonFiniteLoss, match="weights or their gradients became non-finite by step 3"):
        p.check(IntervalRead(loss=1.0, first=1, last=3, finite=False))
