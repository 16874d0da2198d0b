"""Training runs end to end (real DALI pipeline in CPU-only mode, real LMDB, real PyTorch) on a tiny
dataset: what a run writes (its directory, metrics, alerts, TensorBoard) and that it learns."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _train_fixtures import STEPS, metrics_lines, run_config, train_recording, train_watched

from alexnet.trainer.config import TrainConfig
from alexnet.trainer.distributed import DistInfo


def test_alerts_reach_the_console_and_metrics(train_data, tmp_path, capsys):
    """The trainer wires LossWatch in: a band wide enough that any loss is 'near chance' (2 intervals)
    and a factor low enough that any rise counts as 'exploding' raise one line each, once."""
    from alexnet.trainer.train import train

    run = tmp_path / "run"
    train(run_config(train_data, run, max_steps=4, stall_intervals=2, stall_band=10.0, explode_factor=1e-9))
    out = capsys.readouterr()
    text = out.out + out.err
    assert text.count("warning: the training loss has stayed within") == 1
    assert text.count("its first logged value") == 1 and "docs/TRAINING.md#a-stalled-run" in text
    alerts = [(x["alert"], x["step"]) for x in metrics_lines(run) if x["kind"] == "alert"]
    assert alerts == [("exploding", 1), ("stalled", 2)]


def test_run_directory_contents(uninterrupted):
    run, summary = uninterrupted
    cfg = TrainConfig.load(run / "config.json")
    assert cfg.run.num_classes == 4 and cfg.run.max_steps == STEPS and cfg.run.gpus == "cpu"
    assert cfg.data.pipelines == 1  # "auto" resolved and recorded: 1 on the CPU (2 on a GPU)
    v = json.loads((run / "versions.json").read_text())
    assert {"alexnet", "torch", "dali", "pil", "python", "git_revision"} <= v.keys()
    lines = metrics_lines(run)
    train_lines = [x for x in lines if x["kind"] == "train"]
    evals = [x for x in lines if x["kind"] == "eval"]
    assert {"step", "epoch", "loss", "lr", "images_per_s", "weight_norm", "grad_norm"} <= train_lines[0].keys()
    from alexnet.trainer.model import LEARNED_LAYERS

    assert list(train_lines[0]["weight_norm"]) == list(train_lines[0]["grad_norm"]) == list(LEARNED_LAYERS)
    assert [x["step"] for x in train_lines] == list(range(1, STEPS + 1))
    assert len(evals) == 1 and evals[0]["epoch"] == 1 and evals[0]["step"] == 4 and evals[0]["ten_crop"] is False
    assert evals[0]["images"] == 8 and 0 <= evals[0]["top5_err"] <= evals[0]["top1_err"] <= 1
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["best.pt", "epoch-0001.pt", "last.pt"]
    raw = torch.load(run / "checkpoints" / "epoch-0001.pt", weights_only=True)
    assert raw["step"] == 4 and raw["epoch"] == 1 and raw["batch_in_epoch"] == 0
    assert summary["stop_reason"] == "max_steps" and summary["epochs_completed"] == 1


def test_short_run_lowers_the_loss(train_data, tmp_path):
    """96 steps lower the held-out loss (eval mode, centre crops of the val split).

    Batch 8 and lr 1e-3 on 16 images of 4 classes: there the paper's 0.01 overshoots (the curvature
    along each class's logit offset grows as 1/classes, docs/TRAINING.md), and at 1e-3 the start is
    slow: measured 1.481 -> 1.402 here. A trainer that does not learn stays at its first value.
    """
    import torch.nn.functional as F

    from alexnet.trainer.model import AlexNet
    from alexnet.trainer.replica import create_loader_for, resolve_replica

    cfg = run_config(
        train_data,
        tmp_path / "run",
        max_steps=0,
        epochs=12,
        batch_size=8,
        lr=1e-3,
        keep_epochs=2,
        schedule="step",
        step_epochs=(100,),
    )
    _, model = train_watched(cfg)
    trained = [model]
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["best.pt", "epoch-0011.pt", "epoch-0012.pt", "last.pt"]  # --keep-epochs 2
    torch.manual_seed(cfg.run.seed)
    fresh = AlexNet(num_classes=4)  # the same seeded initialisation the run started from

    def held_out_loss(model):
        model.eval()
        loader = create_loader_for(cfg, "val", resolve_replica("cpu", DistInfo()), batch_size=8)
        with torch.no_grad():
            return float(np.mean([F.cross_entropy(model(x), y.reshape(-1).long()).item() for x, y in loader]))

    before, after = held_out_loss(fresh), held_out_loss(trained[0])
    assert after < before - 0.04, (before, after)


def test_metrics_are_read_one_interval_late_and_equal_a_synchronous_read(train_data, tmp_path, monkeypatch):
    """Every 2 steps (4 steps an epoch, 6 steps): the host reads once per logged interval, only at log
    points or before a checkpoint or epoch end, and a step's line is written one interval later; each
    line holds the mean of its steps' losses and the norms after its step, as synchronous reads give."""
    run = tmp_path / "run"
    train, rec = train_recording(monkeypatch)
    summary = train(run_config(train_data, run, log_every_steps=2))
    # (reads, lines written) when each step is done: nothing is read at step 2; the line for step 2
    # is read at step 4, then step 4's before the epoch's end; step 6's before the final checkpoint.
    assert rec["seen"] == [(0, 0)] * 4 + [(2, 2)] * 2
    lines = [x for x in metrics_lines(run) if x["kind"] == "train"]
    assert [x["step"] for x in lines] == [2, 4, 6] and rec["reads"] == 3
    losses = rec["losses"]
    for x in lines:
        s = x["step"]
        assert x["loss"] == pytest.approx((losses[s - 1] + losses[s]) / 2, rel=1e-6, abs=0)
        assert {"weight_norm": x["weight_norm"], "grad_norm": x["grad_norm"]} == rec["norms"][s]
        assert x["epoch_progress"] == (1.0 if s == 4 else 0.5) and x["epoch"] == (0 if s <= 4 else 1)
    assert summary["final_loss"] == lines[-1]["loss"]
    assert rec["norms"][3]["grad_norm"] != rec["norms"][2]["grad_norm"]  # a line one step off would differ


def _tensorboard_scalars(run) -> tuple[dict[str, dict[int, float]], list[int]]:
    """Every scalar in ``RUN/tensorboard``, read from the event files (TFRecord framing, Event protos)
    in write order, applying TensorBoard's purge rule: a session START with step S drops the earlier
    events at steps >= S (what a resumed run writes). Also returns the purge steps."""
    import struct

    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted((run / "tensorboard").glob("events.out.tfevents.*")):  # name order, as TensorBoard reads
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack_from("<Q", data, pos)
            events.append(event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n]))
            pos += 12 + n + 4  # length, its crc, the record, its crc
    scalars: dict[str, dict[int, float]] = {}
    purges = []
    for e in events:
        if e.HasField("session_log") and e.session_log.status == event_pb2.SessionLog.START:
            purges.append(e.step)
            for series in scalars.values():
                for step in [s for s in series if s >= e.step]:
                    del series[step]
        for v in e.summary.value:
            scalars.setdefault(v.tag, {})[e.step] = v.simple_value
    return scalars, purges


def test_tensorboard_has_the_metrics_scalars_and_a_resume_purges_the_killed_tail(uninterrupted, killed_and_resumed):
    (run_a, _), (run_b, _, killed_ck) = uninterrupted, killed_and_resumed
    (a, purges_a), (b, purges_b) = _tensorboard_scalars(run_a), _tensorboard_scalars(run_b)
    assert purges_a == [] and purges_b == [killed_ck["step"] + 1]
    assert {"train/loss", "train/lr", "train/images_per_s", "val/top1_err", "val/top5_err"} <= a.keys()
    lines = metrics_lines(run_a)
    loss = {x["step"]: x["loss"] for x in lines if x["kind"] == "train"}
    assert a["train/loss"] == pytest.approx(loss, rel=1e-6)  # float32 in the event file
    (ev,) = [x for x in lines if x["kind"] == "eval"]
    assert a["val/top1_err"] == pytest.approx({ev["step"]: ev["top1_err"]}, rel=1e-6)
    # the killed run's events after its checkpoint are purged: the same series as uninterrupted
    assert len(list((run_b / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-6)
    assert sorted(b["train/lr"]) == list(range(1, STEPS + 1))


def test_metrics_log_resume_purges_the_killed_runs_later_tensorboard_events(tmp_path):
    import time

    from alexnet.trainer.rundir import MetricsLog

    def log(resume_step, steps, loss):
        m = MetricsLog(tmp_path, True, time.monotonic(), resume_step=resume_step)
        for step in steps:
            m.write({"kind": "train", "step": step, "epoch": 0, "loss": loss(step), "lr": 0.01, "images_per_s": 1.0})
        m.close()

    log(None, range(1, 7), lambda s: 10.0 + s)  # killed after step 6, its checkpoint at step 3
    log(3, range(4, 6), lambda s: 20.0 + s)  # resumed: steps 4 and 5 again, then stopped
    scalars, purges = _tensorboard_scalars(tmp_path)
    assert purges == [4]
    assert scalars["train/loss"] == {1: 11.0, 2: 12.0, 3: 13.0, 4: 24.0, 5: 25.0}  # step 6 purged


@pytest.mark.gpu
def test_no_host_synchronisation_between_log_points_on_a_gpu(tmp_path, monkeypatch):
    """Graphed steps fed by the GPU pipeline, log points and their layer norms run under
    torch.cuda.set_sync_debug_mode("error") from the first read on (the warm-up's cuDNN search and the
    graph's capture are done by then): any synchronising torch call between two reads raises. The
    mode is lifted for each read (HostCopy.read) and for the final checkpoint, which synchronises anyway."""
    from _train_fixtures import write_dataset

    from alexnet.trainer import health
    from alexnet.trainer import train as T

    data = write_dataset(tmp_path / "data", num_classes=4, train_per_class=16)  # 16 steps of 4 an epoch
    state = {"reads": 0, "saving": False}
    real_read, real_save = health.HostCopy.read, T.Trainer.save

    def read(self):
        torch.cuda.set_sync_debug_mode(0)
        values = real_read(self)
        state["reads"] += 1
        if not state["saving"]:
            torch.cuda.set_sync_debug_mode("error")
        return values

    def save(self, *args, **kw):
        state["saving"] = True
        torch.cuda.set_sync_debug_mode(0)
        return real_save(self, *args, **kw)

    monkeypatch.setattr(health.HostCopy, "read", read)
    monkeypatch.setattr(T.Trainer, "save", save)
    try:
        summary = T.train(run_config(data, tmp_path / "run", gpus="0", max_steps=15, log_every_steps=3))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    # reads at steps 6, 9, 12 and 15 (steps 3-12's lines) and before the final checkpoint (step 15's):
    # steps 7-15 and the log points 9, 12 and 15 ran under "error".
    assert summary["steps"] == 15 and state["reads"] == 5
    assert [x["step"] for x in metrics_lines(tmp_path / "run") if x["kind"] == "train"] == [3, 6, 9, 12, 15]
