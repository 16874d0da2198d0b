"""Shared test set-up. Everything runs on the CPU; DALI runs in its CPU-only mode (device_id=None)."""

import os

import pytest

# Keep thread pools small on the 2-core CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped with a reason where there is none")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# --------------------------------------------------------------------------- real runs shared by the trainer's tests


@pytest.fixture(scope="session")
def train_data(tmp_path_factory):
    from _train_fixtures import write_dataset

    return write_dataset(tmp_path_factory.mktemp("train_data") / "data", num_classes=4, train_per_class=4)


@pytest.fixture(scope="session")
def uninterrupted(train_data, tmp_path_factory):
    from _train_fixtures import run_config

    from alexnet.trainer.train import train

    run = tmp_path_factory.mktemp("run_a") / "run"
    summary = train(run_config(train_data, run))
    return run, summary


@pytest.fixture(scope="session")
def killed_and_resumed(train_data, tmp_path_factory):
    from _train_fixtures import KILL_AT, run_config, train_watched

    from alexnet.trainer import checkpoint as ckpt_io
    from alexnet.trainer.train import train

    class Killed(Exception):
        pass

    def crash(step, epoch, labels):
        if step == KILL_AT:
            raise Killed

    run = tmp_path_factory.mktemp("run_b") / "run"
    with pytest.raises(Killed):
        train_watched(run_config(train_data, run, checkpoint_every_steps=3), on_step=crash)
    killed_ck = ckpt_io.load_checkpoint(run / "checkpoints" / "last.pt")
    summary = train(run_config(train_data, run, resume=True))
    return run, summary, killed_ck
