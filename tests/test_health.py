"""The trainer's learning checks: per-layer norms against a plain reference, and the two loss alarms."""

import math

import torch

from alexnet.trainer.health import LossWatch, layer_norms
from alexnet.trainer.model import LEARNED_LAYERS, AlexNet


def test_layer_norms_match_a_plain_computation():
    torch.manual_seed(0)
    model = AlexNet(num_classes=5, devices=["cpu", "cpu"])
    before = layer_norms(model, LEARNED_LAYERS)
    assert before["grad_norm"] == {}  # no gradients yet
    x = torch.randn(2, 3, 224, 224) * 50
    torch.nn.functional.cross_entropy(model.train()(x), torch.tensor([1, 3])).backward()
    norms = layer_norms(model, LEARNED_LAYERS)
    sd = model.state_dict()  # canonical: both columns in one tensor per layer
    # torch's float32 CPU norm of an fc6 column (18.9M elements) is off by up to 8e-4 relative against
    # float64 (measured); a diagnostic needs no more, and a missing column would be 30% off.
    for layer in LEARNED_LAYERS:
        assert math.isclose(norms["weight_norm"][layer], sd[f"{layer}.weight"].double().norm().item(), rel_tol=2e-3)
        grads = [p.grad.double() for n, p in model.named_parameters() if n.startswith(layer + ".") and p.ndim > 1]
        expected = math.sqrt(sum((g**2).sum().item() for g in grads))
        assert math.isclose(norms["grad_norm"][layer], expected, rel_tol=2e-3)
    # The paper's init: N(0, 0.01) weights, so |W| is about 0.01 * sqrt(count).
    assert math.isclose(norms["weight_norm"]["fc6"], 0.01 * math.sqrt(4096 * 9216), rel_tol=0.01)


def test_stalled_is_raised_once_after_the_configured_intervals():
    watch = LossWatch(num_classes=10, stall_intervals=3, stall_band=0.05)
    chance = math.log(10)
    assert watch.observe(10, chance + 0.01) == []
    assert watch.observe(20, chance - 0.05) == []
    alerts = watch.observe(30, chance)
    assert [a["alert"] for a in alerts] == ["stalled"]
    assert alerts[0]["kind"] == "alert" and "docs/TRAINING.md" in alerts[0]["message"]
    assert watch.observe(40, chance) == []  # once


def test_leaving_the_band_resets_the_count():
    watch = LossWatch(num_classes=10, stall_intervals=3)
    chance = math.log(10)
    for step, loss in enumerate([chance, chance, 1.5, chance, chance]):
        assert watch.observe(step, loss) == []
    assert [a["alert"] for a in watch.observe(9, chance)] == ["stalled"]


def test_exploding_loss_is_raised_once_and_survives_a_resume():
    watch = LossWatch(num_classes=10, explode_factor=3.0)
    assert watch.observe(1, 2.3) == []
    assert watch.observe(2, 6.8) == []  # below 3 x 2.3
    resumed = LossWatch(num_classes=10, explode_factor=3.0)
    resumed.load_state_dict(watch.state_dict())  # the first loss comes from the checkpoint
    alerts = resumed.observe(7, 12.8)
    assert [a["alert"] for a in alerts] == ["exploding"] and "5.6x" in alerts[0]["message"]
    assert resumed.observe(8, 14.0) == []
    assert LossWatch(num_classes=10, explode_factor=0).observe(1, 1.0) == []


def test_off_switches_and_non_finite_losses():
    watch = LossWatch(num_classes=10, stall_intervals=0, explode_factor=0)
    for step in range(100):
        assert watch.observe(step, math.log(10)) == []
    assert LossWatch(num_classes=10).observe(1, float("nan")) == []


def test_layer_norms_leave_out_missing_gradients_and_match_per_tensor_norms():
    """The multi-tensor form against the per-tensor one it replaced, on the two-column network with
    one layer's gradients missing (left out) and another's present on one column only."""
    from alexnet.trainer.health import HostCopy, LayerNorms

    torch.manual_seed(1)
    model = AlexNet(num_classes=5, devices=["cpu", "cpu"])
    x = torch.randn(2, 3, 224, 224) * 50
    torch.nn.functional.cross_entropy(model.train()(x), torch.tensor([0, 4])).backward()
    for name, p in model.named_parameters():
        if name.startswith("fc7.") or name == "conv2.columns.1.weight":
            p.grad = None
    weights = {
        layer: [p for n, p in model.named_parameters() if n.split(".")[0] == layer and p.ndim > 1]
        for layer in LEARNED_LAYERS
    }
    assert len(weights["conv2"]) == 2  # both columns
    norms = LayerNorms(model, LEARNED_LAYERS)
    values = norms.compute(torch.device("cpu"))
    assert values.shape == (2 * len(LEARNED_LAYERS),)
    got = norms.as_dict(HostCopy(values).read())
    assert "fc7" not in got["grad_norm"] and list(got["weight_norm"]) == list(LEARNED_LAYERS)
    for layer, params in weights.items():
        w = torch.stack([p.detach().norm() ** 2 for p in params]).sum().sqrt().item()
        assert math.isclose(got["weight_norm"][layer], w, rel_tol=1e-6)
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            g = torch.stack([t.norm() ** 2 for t in grads]).sum().sqrt().item()
            assert math.isclose(got["grad_norm"][layer], g, rel_tol=1e-6)
    assert "conv2" in got["grad_norm"]  # present on one column: that column's norm
    with torch.no_grad():
        model.conv3.columns[1].weight.view(-1)[7] = float("nan")  # a non-finite weight is kept, not left out
    got = norms.as_dict(norms.compute(torch.device("cpu")).tolist())
    assert math.isnan(got["weight_norm"]["conv3"]) and math.isfinite(got["weight_norm"]["conv2"])


def test_feed_wait_counts_the_wait_for_batches_not_the_steps_time():
    """Host time on the CPU: a loader taking 50 ms a batch behind steps of 150 ms waits 4 x 50 ms."""
    import time

    from alexnet.trainer.health import FeedWait

    def slow_loader():
        for i in range(4):
            time.sleep(0.05)
            yield i

    feed = FeedWait(torch.device("cpu"))
    assert list(_consume(feed.batches(slow_loader()), step_s=0.15)) == [0, 1, 2, 3]
    waited = feed.take().seconds()
    assert 0.2 <= waited < 0.5, waited  # the steps' 0.6 s are not counted
    assert feed.take().seconds() == 0.0  # taken: the next interval starts from zero


def _consume(batches, step_s):
    import time

    for b in batches:
        time.sleep(step_s)
        yield b


def test_feed_wait_warning_once_after_the_first_interval_naming_the_tool():
    from alexnet.trainer.health import FEED_WAIT_WARN_SHARE, FeedWatch

    watch = FeedWatch()
    assert watch.observe(1, 10, 0.9, 2.3) == []  # the first interval holds the pipelines' start
    assert watch.observe(11, 20, FEED_WAIT_WARN_SHARE, 2.3) == []  # at the share: no warning
    alerts = watch.observe(21, 30, 0.4, 2.3)
    assert [a["alert"] for a in alerts] == ["feed_wait"] and alerts[0]["step"] == 30
    message = alerts[0]["message"]
    for piece in ("40%", "steps 21-30", "bench-pipeline", "--workers", "--pipelines", "--num-threads"):
        assert piece in message, message
    assert watch.observe(31, 40, 0.9, 2.3) == []  # once


def test_training_lines_carry_the_feed_wait_and_the_report_shows_it(tmp_path):
    import json

    from _train_fixtures import write_dataset

    from alexnet.trainer.config import TrainConfig
    from alexnet.trainer.report import build_report
    from alexnet.trainer.train import train

    data = write_dataset(tmp_path / "data", num_classes=2, train_per_class=4, val_per_class=1)
    config = TrainConfig.create(
        data_dir=str(data),
        run_dir=str(tmp_path / "run"),
        gpus="cpu",
        batch_size=4,
        epochs=0,
        max_steps=3,
        log_every_steps=1,
        num_threads=1,
        progress=False,
        checkpoint_minutes=0.0,
    )
    train(config)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if x["kind"] == "train"]
    assert [x["step"] for x in train_lines] == [1, 2, 3]
    for x in train_lines:
        assert 0 < x["feed_wait_s"] and 0 < x["feed_wait_share"] <= 1, x  # DALI decodes on this host
        assert "memory" not in x  # a GPU figure
    build_report(tmp_path / "run", tmp_path / "report")
    assert "- feed wait (the step waiting for its batch): median" in (tmp_path / "report" / "report.md").read_text()
