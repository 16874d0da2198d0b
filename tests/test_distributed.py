"""Several replicas: what each launcher's environment means (torchrun, SLURM, Open MPI) and which
GPUs a replica takes; then torchrun + DistributedDataParallel, two replicas with gloo on the CPU over loopback.

Each run launches ``.venv/bin/torchrun --nproc-per-node 2 tests/_ddp_worker.py`` as a subprocess
(real processes, real process group). The training set gives every record its own label, so the
labels a replica trained on say exactly which records it saw.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _train_fixtures import train_watched, write_dataset

from alexnet.pipeline.errors import AlexnetError
from alexnet.trainer import checkpoint as ckpt_io
from alexnet.trainer.config import TrainConfig
from alexnet.trainer.distributed import DistInfo, replica_gpus

HERE = Path(__file__).resolve().parent
TORCHRUN = Path(sys.executable).parent / "torchrun"
WORLD = 2
RECORDS = 16  # training records, one label each
GLOBAL_BATCH = 8  # 4 per replica: 2 steps per epoch
STEPS = 6  # 3 epochs

needs_torchrun = pytest.mark.skipif(not TORCHRUN.exists(), reason=f"torchrun not found beside {sys.executable}")


# --------------------------------------------------------------------------- launchers and devices


@pytest.mark.parametrize(
    ("spec", "local_rank", "local_world", "cuda", "want"),
    [
        ("auto", 0, 1, 0, "cpu"),
        ("auto", 0, 1, 1, "0"),
        ("auto", 0, 1, 2, "0,1"),
        ("auto", 1, 2, 4, "2,3"),
        ("auto", 1, 2, 2, "1"),
        ("0,1", 1, 2, 4, "2,3"),
        ("0", 3, 4, 4, "3"),
        ("cpu", 1, 2, 0, "cpu"),
    ],
)
def test_replica_gpus(spec, local_rank, local_world, cuda, want):
    info = DistInfo(rank=local_rank, world_size=local_world, local_rank=local_rank, local_world_size=local_world)
    assert replica_gpus(spec, info, cuda) == want


@pytest.mark.parametrize(
    ("local_world", "cuda", "message"),
    [(4, 2, "4 replicas on this node but only 2 GPU"), (2, 0, "no GPU visible")],
)
def test_auto_gpus_never_falls_back_to_the_cpu_silently(local_world, cuda, message):
    info = DistInfo(rank=1, world_size=local_world, local_rank=1, local_world_size=local_world)
    with pytest.raises(AlexnetError, match=message):
        replica_gpus("auto", info, cuda)
    assert replica_gpus("cpu", info, cuda) == "cpu"  # explicit --gpus cpu still trains there


@pytest.mark.parametrize(
    ("env", "want"),
    [
        ({}, DistInfo()),
        ({"WORLD_SIZE": "1"}, DistInfo()),
        # torchrun
        ({"WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}, DistInfo(5, 8, 1, 4)),
        # srun, 2 nodes x 4 tasks: without the SLURM variables rank 5 would look like local replica 5 of 8
        (
            {
                "SLURM_STEP_NUM_TASKS": "8",
                "SLURM_PROCID": "5",
                "SLURM_LOCALID": "1",
                "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
                "SLURM_NODEID": "1",
            },
            DistInfo(5, 8, 1, 4),
        ),
        (
            {
                "SLURM_STEP_NUM_TASKS": "7",
                "SLURM_PROCID": "5",
                "SLURM_LOCALID": "1",
                "SLURM_STEP_TASKS_PER_NODE": "4,3",
                "SLURM_NODEID": "1",
            },
            DistInfo(5, 7, 1, 3),
        ),
        # the batch script of sbatch -n 4 is one process, not a launch of 4
        ({"SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_TASKS_PER_NODE": "4"}, DistInfo()),
        # torchrun's WORLD_SIZE/RANK beside SLURM's local variables
        (
            {"WORLD_SIZE": "8", "RANK": "6", "SLURM_LOCALID": "2", "SLURM_STEP_TASKS_PER_NODE": "4(x2)"},
            DistInfo(6, 8, 2, 4),
        ),
        # mpirun inside an sbatch script: the batch script's SLURM_PROCID (0 everywhere) must not win
        (
            {
                "SLURM_NTASKS": "8",
                "SLURM_PROCID": "0",
                "SLURM_LOCALID": "0",
                "OMPI_COMM_WORLD_SIZE": "4",
                "OMPI_COMM_WORLD_RANK": "2",
                "OMPI_COMM_WORLD_LOCAL_RANK": "0",
                "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
            },
            DistInfo(2, 4, 0, 2),
        ),
        # mpirun whose daemons srun started (2 nodes): the step has 2 tasks, Open MPI's world is 8
        (
            {
                "SLURM_STEP_NUM_TASKS": "2",
                "SLURM_PROCID": "1",
                "SLURM_LOCALID": "0",
                "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
                "SLURM_NODEID": "1",
                "OMPI_COMM_WORLD_SIZE": "8",
                "OMPI_COMM_WORLD_RANK": "5",
                "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
            },
            DistInfo(5, 8, 1, 4),
        ),
        # mpirun (Open MPI)
        (
            {
                "OMPI_COMM_WORLD_SIZE": "4",
                "OMPI_COMM_WORLD_RANK": "3",
                "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
            },
            DistInfo(3, 4, 1, 2),
        ),
    ],
)
def test_launcher_environments(env, want):
    from alexnet.trainer.distributed import dist_info_from_env

    assert dist_info_from_env(env) == want


def test_launcher_without_local_rank_is_one_line():
    from alexnet.trainer.distributed import dist_info_from_env

    with pytest.raises(AlexnetError, match="no LOCAL_RANK, LOCAL_WORLD_SIZE: launch with torchrun, or set"):
        dist_info_from_env({"WORLD_SIZE": "8", "RANK": "5"})
    with pytest.raises(AlexnetError, match="SLURM_STEP_NUM_TASKS=4 .* no LOCAL_WORLD_SIZE"):
        dist_info_from_env({"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "1", "SLURM_LOCALID": "1"})


# --------------------------------------------------------------------------- two replicas under torchrun


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(
    config: TrainConfig, out: Path, kill_at: int = 0, term_at: int = 0, kill9_at: int = 0, max_restarts: int = 0
) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "config-in.json"
    cfg_path.write_text(json.dumps(config.to_dict()))
    args = [
        str(TORCHRUN),
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(WORLD),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        "--max-restarts",
        str(max_restarts),
        "--monitor-interval",
        "0.2",
        str(HERE / "_ddp_worker.py"),
        str(cfg_path),
        str(out),
    ]
    if kill_at:
        args.append(str(kill_at))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "TERM_AT": str(term_at),
        "KILL9_AT": str(kill9_at),
    }
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory):
    return write_dataset(
        tmp_path_factory.mktemp("ddp") / "data",
        num_classes=RECORDS // 2,
        train_per_class=2,
        val_per_class=1,
        unique_labels=True,
        num_shards=2,
    )


def _config(data: Path, run_dir: Path, **kw) -> TrainConfig:
    base = dict(
        data_dir=str(data),
        run_dir=str(run_dir),
        gpus="cpu",
        batch_size=GLOBAL_BATCH,
        epochs=0,
        max_steps=STEPS,
        lr=1e-3,
        log_every_steps=1,
        num_threads=1,
        progress=False,
        checkpoint_minutes=0.0,
    )
    base.update(kw)
    return TrainConfig.create(**base)


@pytest.fixture(scope="module")
def uninterrupted(ddp_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_a")
    r = _launch(_config(ddp_data, out / "run"), out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def _labels(out: Path) -> list[list[dict]]:
    return [json.loads((out / f"labels-rank{r}.json").read_text()) for r in range(WORLD)]


@needs_torchrun
def test_replicas_stay_in_sync(uninterrupted):
    w = [torch.load(uninterrupted / f"weights-rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert w[0].keys() == w[1].keys()
    for k in w[0]:
        assert torch.equal(w[0][k], w[1][k]), k
    # and they trained: the weights moved away from the seeded initialisation
    torch.manual_seed(0)
    from alexnet.trainer.model import AlexNet

    init = AlexNet(num_classes=len(w[0]["fc8.bias"])).state_dict()
    assert not torch.equal(init["fc8.weight"], w[0]["fc8.weight"])


@needs_torchrun
def test_replicas_together_see_every_record_once_per_epoch(uninterrupted):
    seen = _labels(uninterrupted)
    per_rank_records = RECORDS // WORLD
    for epoch in range(STEPS * GLOBAL_BATCH // RECORDS):
        mine = [sorted(lab for b in s if b["epoch"] == epoch for lab in b["labels"]) for s in seen]
        assert all(len(m) == per_rank_records for m in mine), mine
        assert sorted(mine[0] + mine[1]) == list(range(RECORDS)), (epoch, mine)
        assert not set(mine[0]) & set(mine[1])


@needs_torchrun
def test_only_rank0_writes_and_checkpoint_records_both_replicas(uninterrupted):
    run = uninterrupted / "run"
    assert (run / "config.json").exists() and (run / "versions.json").exists()
    ck = ckpt_io.load_checkpoint(run / "checkpoints" / "last.pt")
    assert ck["world_size"] == WORLD and len(ck["rng"]) == WORLD and ck["step"] == STEPS
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [x["step"] for x in lines if x["kind"] == "train"]
    assert train_steps == sorted(set(train_steps))  # one writer: no duplicated lines


def _resume_and_compare(ddp_data: Path, run: Path, uninterrupted: Path, out: Path) -> None:
    """Resume ``run`` to the end; its final weights equal the uninterrupted run's, bitwise."""
    r = _launch(_config(ddp_data, run, resume=True), out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a = ckpt_io.load_checkpoint(uninterrupted / "run" / "checkpoints" / "last.pt")["model"]
    b = ckpt_io.load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


@needs_torchrun
def test_resume_with_same_replica_count_is_exact(ddp_data, uninterrupted, tmp_path):
    run = tmp_path / "run"
    # checkpoint every 3 steps; crash at step 4, before epoch 2's end: resume from mid-epoch step 3
    r = _launch(_config(ddp_data, run, checkpoint_every_steps=3), tmp_path, kill_at=4)
    assert r.returncode != 0
    ck = ckpt_io.load_checkpoint(run / "checkpoints" / "last.pt")
    assert (ck["step"], ck["batch_in_epoch"]) == (3, 1)
    _resume_and_compare(ddp_data, run, uninterrupted, tmp_path)


@needs_torchrun
def test_sigterm_to_one_replica_stops_both_and_resume_is_exact(ddp_data, uninterrupted, tmp_path):
    """A real SIGTERM to replica 1 alone at step 3 (mid-epoch, between log points): replica 0 goes on
    until the replicas next agree (the end of epoch 2 at step 4), both stop there with one consistent
    checkpoint holding both loader positions, and --resume ends bitwise equal."""
    run = tmp_path / "run"
    r = _launch(_config(ddp_data, run, log_every_steps=5), tmp_path, term_at=3)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]  # the worker returns; the CLI exits 143
    summaries = [json.loads((tmp_path / f"summary-rank{k}.json").read_text()) for k in range(WORLD)]
    assert [(s["stop_reason"], s["steps"]) for s in summaries] == [("signal", 4)] * WORLD
    assert [s["signal"] for s in summaries] == [None, "SIGTERM"]  # only replica 1 received it
    ck = ckpt_io.load_checkpoint(run / "checkpoints" / "last.pt")
    assert (ck["step"], ck["batch_in_epoch"], len(ck["rng"])) == (4, 0, WORLD)
    _resume_and_compare(ddp_data, run, uninterrupted, tmp_path)


@needs_torchrun
def test_resume_with_one_replica_continues_the_epochs_permutation(ddp_data, uninterrupted, tmp_path):
    """Killed at step 4 with 2 replicas (checkpoint at step 3, mid-epoch), resumed in one process with
    the same global batch: every later step trains on exactly the records the uninterrupted 2-replica
    run trained on at that step (the same permutation; nothing repeated or skipped)."""

    run = tmp_path / "run"
    r = _launch(_config(ddp_data, run, checkpoint_every_steps=3), tmp_path, kill_at=4)
    assert r.returncode != 0
    seen: dict[int, list[int]] = {}
    summary, _ = train_watched(
        _config(ddp_data, run, resume=True),
        on_step=lambda step, epoch, labels: seen.setdefault(step, sorted(labels.reshape(-1).tolist())),
    )
    want: dict[int, list[int]] = {}
    for batches in _labels(uninterrupted):
        for b in batches:
            want.setdefault(b["step"], []).extend(b["labels"])
    assert summary["steps"] == STEPS
    assert seen == {step: sorted(want[step]) for step in range(4, STEPS + 1)}


def test_elastic_restart_after_a_lost_replica_resumes_exactly(ddp_data, uninterrupted, tmp_path):
    """Under ``torchrun --max-restarts 2`` without --resume, replica 1 is killed with SIGKILL at step 3
    (after step 2's checkpoint): the survivor exits promptly instead of hanging in a collective, torchrun
    restarts the group, which resumes at step 2 by itself and ends bitwise equal to the uninterrupted run,
    with one metrics line per step."""
    run = tmp_path / "run"
    r = _launch(_config(ddp_data, run, checkpoint_every_steps=2), tmp_path, kill9_at=3, max_restarts=2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "torchrun restart 1: resuming from the last checkpoint" in r.stderr, r.stderr[-3000:]
    assert "resuming at step 2 from" in r.stderr, r.stderr[-3000:]
    a = ckpt_io.load_checkpoint(uninterrupted / "run" / "checkpoints" / "last.pt")["model"]
    b = ckpt_io.load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["kind"] == "train"] == list(range(1, STEPS + 1))
    # the restarted attempt ran only the remaining steps
    assert [b["step"] for b in _labels(tmp_path)[0]] == list(range(3, STEPS + 1))


def test_restart_without_a_checkpoint_starts_afresh_without_old_metrics(ddp_data, tmp_path, monkeypatch, capsys):
    """A torchrun restart (TORCHELASTIC_RESTART_COUNT=1, here one process) that finds no checkpoint says so,
    starts at step 0 and drops the failed attempt's metrics instead of appending to them."""
    from alexnet.trainer.train import train

    run = tmp_path / "run"
    run.mkdir()
    from alexnet.trainer.rundir import record

    stale = [
        record("train", step=s, epoch=0, epoch_progress=0.5, loss=9.0, lr=0.01, images_per_s=1.0) for s in (1, 2, 3)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in stale))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    summary = train(_config(ddp_data, run, max_steps=2, batch_size=4))
    assert "torchrun restart 1: no checkpoint at" in capsys.readouterr().err
    assert summary["steps"] == 2
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["kind"] == "train"] == [1, 2]
    assert all(x["loss"] != 9.0 for x in lines if x["kind"] == "train")
