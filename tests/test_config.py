"""The run's config tree: the paper's defaults, the JSON round trip, loud failures, resume rules."""

from __future__ import annotations

import pytest

from alexnet.pipeline.errors import AlexnetError
from alexnet.trainer.config import TrainConfig, merge_for_resume


def test_config_defaults_are_the_papers():
    c = TrainConfig()
    o = c.optim
    assert (o.batch_size, o.lr, o.momentum, o.weight_decay, o.lr_drops, c.run.epochs) == (128, 0.01, 0.9, 5e-4, 3, 90)


def test_config_json_round_trip_and_loud_failures(tmp_path):
    c = TrainConfig.create(batch_size=32, step_epochs=(5, 9), precision="bf16")
    c.save(tmp_path / "config.json")
    assert TrainConfig.load(tmp_path / "config.json") == c
    d = c.to_dict()
    assert set(d) == {"run", "data", "model", "optim"}

    def changed(section, **kw):
        return {**d, section: {**d[section], **kw}}

    with pytest.raises(AlexnetError, match="unknown key.*learning_rate.*optim"):
        TrainConfig.from_dict(changed("optim", learning_rate=0.1))
    with pytest.raises(AlexnetError, match="unknown section"):
        TrainConfig.from_dict({**d, "extra": {}})
    with pytest.raises(AlexnetError, match="batch_size.*wrong type"):
        TrainConfig.from_dict(changed("optim", batch_size="32"))
    with pytest.raises(AlexnetError, match="precision.*wrong type"):
        TrainConfig.from_dict(changed("model", precision=1))
    with pytest.raises(AlexnetError, match="schedule must be"):
        TrainConfig.from_dict(changed("optim", schedule="cosine"))
    with pytest.raises(AlexnetError, match="unknown config field"):
        c.replace(learning_rate=0.1)
    assert TrainConfig.from_dict(changed("optim", lr=1)).optim.lr == 1.0  # an int is a fine float


def test_resume_refuses_a_changed_recipe():
    saved = TrainConfig.create(batch_size=32)
    assert merge_for_resume(saved, {"max_steps": 9, "gpus": "cpu"}).run.max_steps == 9
    with pytest.raises(AlexnetError, match="lr"):
        merge_for_resume(saved, {"lr": 0.1})


def test_default_retention_keeps_three_epoch_checkpoints():
    assert TrainConfig().run.keep_epochs == 3
