"""Checkpoint files: the weights-only safe encoding, generators, one-line errors, pruning."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from alexnet.pipeline.errors import AlexnetError
from alexnet.trainer import checkpoint as ckpt_io
from alexnet.trainer.rundir import epoch_name


def test_safe_encoding_round_trip_and_weights_only_load(tmp_path):
    state = {
        "arr": np.arange(12, dtype=np.uint32).reshape(3, 4),
        "f64": np.array([1.5, -2.0]),
        "scalar": np.int64(7),
        "raw": b"\x00\x01position",
        "empty": b"",
        "tuple": ("MT19937", np.arange(3, dtype=np.uint32), 5, 0, 0.0),
        "nested": [{"a": 1, "b": None}, 2.5, "s"],
        "t": torch.arange(4),
        "np_rng": np.random.get_state(),
        "py_rng": random.getstate(),
    }
    path = tmp_path / "c.pt"
    ckpt_io.save_checkpoint(path, {"model": {"w": torch.ones(2)}, "extra": state})
    raw = torch.load(path, weights_only=True)  # loads without unpickling any foreign object
    assert isinstance(raw["extra"]["raw"], dict)
    back = ckpt_io.load_checkpoint(path)["extra"]
    np.testing.assert_array_equal(back["arr"], state["arr"])
    assert back["arr"].dtype == np.uint32
    assert back["scalar"] == 7 and back["raw"] == state["raw"] and back["empty"] == b""
    assert back["tuple"][0] == "MT19937" and isinstance(back["tuple"], tuple)
    assert back["nested"] == state["nested"]
    torch.testing.assert_close(back["t"], state["t"])
    np.random.set_state(back["np_rng"])
    random.setstate(back["py_rng"])
    with pytest.raises(TypeError):
        ckpt_io.to_safe({"x": object()})


def test_rng_state_restores_dropout_masks():
    torch.manual_seed(3)
    st = ckpt_io.rng_state()
    a = torch.nn.functional.dropout(torch.ones(100), 0.5)
    ckpt_io.set_rng_state(ckpt_io.from_safe(ckpt_io.to_safe(st)))
    b = torch.nn.functional.dropout(torch.ones(100), 0.5)
    assert torch.equal(a, b)


def test_bad_checkpoint_is_one_clear_error(tmp_path):
    p = tmp_path / "bad.pt"
    p.write_bytes(b"not a checkpoint")
    with pytest.raises(AlexnetError, match="cannot read checkpoint"):
        ckpt_io.load_checkpoint(p)
    with pytest.raises(AlexnetError, match="no checkpoint"):
        ckpt_io.load_checkpoint(tmp_path / "missing.pt")


def test_prune_epoch_checkpoints_keeps_the_newest_and_linked_files(tmp_path):
    for e in (1, 2, 3, 10):
        (tmp_path / epoch_name(e)).write_bytes(b"epoch %d" % e)
    os.link(tmp_path / "epoch-0001.pt", tmp_path / "best.pt")  # best.pt shares epoch 1's file
    (tmp_path / "epoch-notes.pt").write_bytes(b"not an epoch checkpoint")
    deleted = ckpt_io.prune_epoch_checkpoints(tmp_path, 2)
    assert [p.name for p in deleted] == ["epoch-0001.pt", "epoch-0002.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "epoch-0003.pt", "epoch-0010.pt", "epoch-notes.pt"]
    assert (tmp_path / "best.pt").read_bytes() == b"epoch 1"
    with pytest.raises(ValueError):
        ckpt_io.prune_epoch_checkpoints(tmp_path, 0)
