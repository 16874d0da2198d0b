"""The training loop (§5), evaluation (§4.1 centre crop and ten patches) and the throughput benchmark.

``train(config) -> summary`` runs (or resumes) one run directory::

    RUN/config.json        the resolved TrainConfig
    RUN/versions.json      package, torch, DALI, PIL, python, git revision
    RUN/metrics.jsonl      one JSON object per line (kind "train" or "eval")
    RUN/checkpoints/       last.pt, epoch-XXXX.pt, best.pt (see checkpoint.py)
    RUN/tensorboard/       TensorBoard event files (tensorboardX): the same scalars

Exactness of ``--resume``: the checkpoint carries the model, the optimiser's velocities, the
schedule, the step and epoch counters, every generator the step draws from (torch CPU and CUDA:
dropout; numpy; python) and the pipeline's position and RNG. On the CPU a run killed after a
checkpoint and resumed ends with bitwise the same weights as an uninterrupted run (tested). On
GPUs cuDNN's algorithm choice (``cudnn.benchmark``) and atomics make runs close, not bitwise (on an
H100 in bf16, 60 steps after a resume: losses within 0.001, weights within 0.007).

Speed on one GPU (benchmarks/results_train.md): each step is one CUDA graph replay
(:class:`GraphedTrainStep`, bitwise the eager step), and ``CUDA_DEVICE_MAX_CONNECTIONS`` is raised
so that DALI's GPU work does not queue behind the training stream.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# Hardware work queues per CUDA context (read when the context is created, so set before any CUDA
# work). With the default 8, DALI's streams share queues with the training stream and each DALI
# batch waits behind whole training steps: the pipeline then starves an H100 (benchmarks/
# results_train.md: 8,000-9,000 img/s instead of 13,000). A value given by the user is kept.
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")

import torch  # noqa: E402
import torch.nn.functional as F

from alexnet.pipeline import constants as C
from alexnet.pipeline import dali
from alexnet.pipeline.artifacts import (
    atomic_write_bytes,
    atomic_write_json,
    read_manifest,
    read_mean_image,
    read_stats,
)
from alexnet.pipeline.errors import AlexnetError

from . import checkpoint as ckpt_io
from . import distributed as D
from .config import CONFIG_FILE, TrainConfig
from .health import LossWatch, layer_norms
from .model import LEARNED_LAYERS
from .optim import create_optimizer, set_lr
from .schedule import create_schedule
from .stop import StopSignals

METRICS_FILE = "metrics.jsonl"
VERSIONS_FILE = "versions.json"
TENSORBOARD_DIR = "tensorboard"
RUNS_DIR = Path("runs")


class NonFiniteLoss(AlexnetError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


# --------------------------------------------------------------------------- small pieces


def average_patch_softmax(logits: torch.Tensor, patches: int) -> torch.Tensor:
    """§4.1 test time: the mean of the softmax outputs over each image's ``patches`` patches.

    ``logits``: [B * patches, K], each image's patches consecutive. Returns [B, K] probabilities.
    """
    probs = torch.softmax(logits.float(), dim=1)
    return probs.view(-1, patches, probs.shape[1]).mean(dim=1)


def topk_correct(probs: torch.Tensor, labels: torch.Tensor, k: int = 5) -> tuple[int, int]:
    """(# whose top-1 is the label, # with the label among the top-k) for a batch."""
    k = min(k, probs.shape[1])
    top = probs.topk(k, dim=1).indices
    labels = labels.reshape(-1, 1).to(top.device)
    return int((top[:, :1] == labels).sum()), int((top == labels).any(dim=1).sum())


def resolve_gpus(spec: str, info: D.DistInfo) -> tuple[str, list[torch.device], str]:
    """This replica's ``--gpus`` value, its devices and a line saying what was chosen."""
    from .model import parse_gpus

    count = torch.cuda.device_count()
    resolved = D.replica_gpus(spec, info, count)
    devices = parse_gpus(resolved)
    why = f" (auto: {count} CUDA device(s) visible)" if spec.strip().lower() == "auto" else ""
    if devices[0].type == "cpu":
        form = "CPU"
    elif len(devices) == 2:
        form = f"column one on GPU {devices[0].index}, column two on GPU {devices[1].index}"
    else:
        form = f"both columns on GPU {devices[0].index}"
    return resolved, devices, f"--gpus {resolved}: {form}{why}"


def _start_replica(config: TrainConfig) -> tuple[D.DistInfo, str, list[torch.device], str]:
    """This process's replica: (dist info, resolved --gpus, its devices, a note on them), group joined."""
    info = D.dist_info_from_env()
    gpus, devices, note = resolve_gpus(config.gpus, info)
    on_gpu = devices[0].type == "cuda"
    D.init_process_group(info, on_gpu, devices[0].index if on_gpu else None)
    return info, gpus, devices, note


def git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def versions() -> dict[str, Any]:
    from importlib import metadata

    from alexnet.pipeline.cli_common import package_version

    def dist_version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    try:
        from alexnet.tools.pil import pil_summary

        pil = pil_summary()
    except ImportError:
        pil = "not installed"
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "alexnet": package_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "dali": dali.installed(),
        "pil": pil,
        "numpy": dist_version("numpy"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpus": gpus,
        "git_revision": git_revision(),
    }


def _sync(devices: list[torch.device]) -> None:
    for d in devices:
        if d.type == "cuda":
            torch.cuda.synchronize(d)


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    torch.manual_seed(seed)  # CPU and every CUDA device
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _replica_seed(seed: int, rank: int, step: int = 0) -> int:
    # Rank 0 of any run draws the single-process stream; other replicas draw their own dropout masks.
    return seed if rank == 0 and step == 0 else (seed * 1_000_003 + rank * 7_919 + step) % 2**63


# --------------------------------------------------------------------------- loaders


def auto_pipelines(device: torch.device) -> int:
    """``--pipelines 0``: 2 per GPU (one pipeline cannot feed an H100), 1 on the CPU."""
    return 2 if device.type == "cuda" else 1


def create_loader_for(
    config: TrainConfig,
    split: str,
    device: torch.device,
    info: D.DistInfo,
    *,
    ten_crop: bool = False,
    batch_size: int | None = None,
):
    """The pipeline's loader for this replica: its share of ``split``, batches on ``device``."""
    from alexnet.pipeline.loader import DataConfig, create_loader

    per_replica = batch_size if batch_size is not None else config.batch_size // info.world_size
    data = DataConfig(
        num_threads=config.num_threads, prefetch=config.prefetch, hw_decoder_load=config.hw_decoder_load,
        pipelines=config.pipelines, decoder=config.decoder, roi_decode=config.roi_decode, mean=config.mean,
        lighting_scale=config.lighting_scale,
    )  # fmt: skip
    return create_loader(
        Path(config.data_dir), split, data, batch_size=per_replica, seed=config.seed, rank=info.rank,
        world=info.world_size, device=str(device) if device.type == "cuda" else "cpu",
        dtype="float32",  # bf16 autocast casts inside the model; fp16 input would lose bits first
        ten_crop=ten_crop,
    )  # fmt: skip


# --------------------------------------------------------------------------- step and evaluation


def train_step(model, optimizer, images, labels, *, bf16: bool, channels_last: bool, output_device) -> torch.Tensor:
    """One SGD step (§5) on one batch; returns the batch's mean loss (a detached device tensor)."""
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = labels.reshape(-1).to(output_device, dtype=torch.long, non_blocking=True)
    # No autocast weight-cast cache: each weight is cast once per step anyway, and a CUDA graph
    # capture (GraphedTrainStep) must not keep cached casts.
    with torch.autocast(device_type=images.device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
        logits = model(images)
    # Multinomial logistic regression objective (§5), computed in float32.
    loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


GRAPH_EAGER_STEPS = 3  # eager steps before a CUDA-graph capture (cuDNN's search, optimiser state)


class GraphedTrainStep:
    """``train_step`` replayed as one CUDA graph: forward, loss, backward and the §5 update.

    Eager PyTorch launches the step's few hundred kernels one by one from Python; at batch 128 in
    bf16 on an H100 launching takes about as long as the GPU takes to run them, so the step is
    bound by the host, and any host work beside it (fetching the pipeline's batch, DALI's threads)
    lengthens every step (benchmarks/results_train.md). Replaying a captured graph costs one launch.

    The first ``eager_steps`` steps run eagerly (cuDNN's algorithm search and the optimiser's
    velocities happen there); the step is then captured with the batch copied into static input
    buffers and replayed from then on. The update bakes the learning rate into its kernels, so a
    change of lr (a /10 drop) captures the step again; a batch of another shape (not in training,
    which drops partial batches) starts the eager warm-up again before its own capture. The kernels
    are the eager step's: same arithmetic, same dropout draws (the CUDA generator advances per
    replay as per eager step). CUDA only, one device, no DDP (:func:`uses_cuda_graph`).
    """

    def __init__(
        self, model, optimizer, *, bf16: bool, channels_last: bool, output_device, eager_steps: int = GRAPH_EAGER_STEPS
    ):
        self.model, self.optimizer = model, optimizer
        self.kw = {"bf16": bf16, "channels_last": channels_last, "output_device": output_device}
        self.channels_last = channels_last
        self.eager_steps = eager_steps
        self.captures = 0
        self.graph = None
        self._shape: tuple | None = None  # batch shape being warmed up or captured
        self._eager_left = 0
        self._hyper_captured = None
        self._x = self._y = self._loss = None

    def _hyper(self) -> tuple:
        return tuple((g["lr"], g["momentum"], g["weight_decay"]) for g in self.optimizer.param_groups)

    def _capture(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.graph = None  # frees the previous graph's memory pool
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        self._x = torch.empty_like(images, memory_format=fmt)
        self._y = torch.empty_like(labels.reshape(-1), dtype=torch.long, device=self.kw["output_device"])
        self.optimizer.zero_grad(set_to_none=True)  # the captured backward allocates the grads in the pool
        graph = torch.cuda.CUDAGraph()
        # thread_local: DALI's threads keep decoding (their CUDA calls would invalidate a "global"
        # capture, and fail themselves); only this thread's calls are checked.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._loss = train_step(self.model, self.optimizer, self._x, self._y, **self.kw)
        self.graph, self._hyper_captured = graph, self._hyper()
        self.captures += 1

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape) != self._shape:  # first call, or a new shape: warm up eagerly first
            self._shape, self._eager_left, self.graph = tuple(images.shape), self.eager_steps, None
        if self._eager_left > 0:
            self._eager_left -= 1
            # Eager warm-up on a side stream (as capture requires), ordered with the caller's stream.
            caller = torch.cuda.current_stream(images.device)
            side = torch.cuda.Stream(images.device)
            side.wait_stream(caller)
            with torch.cuda.stream(side):
                loss = train_step(self.model, self.optimizer, images, labels, **self.kw)
            caller.wait_stream(side)
            images.record_stream(side)
            loss.record_stream(caller)  # its memory came from the side stream's pool
            return loss
        if self.graph is None or self._hyper_captured != self._hyper():
            self._capture(images, labels)
        self._x.copy_(images)
        self._y.copy_(labels.reshape(-1))
        self.graph.replay()
        return self._loss.clone()  # the next replay overwrites the static loss


def uses_cuda_graph(config: TrainConfig, devices: list[torch.device], info: D.DistInfo) -> bool:
    """``--cuda-graph`` (the default) applies to one CUDA device in a single process; else eager."""
    return config.cuda_graph and len(devices) == 1 and devices[0].type == "cuda" and not info.enabled


def make_step(model, optimizer, config: TrainConfig, devices: list[torch.device], info: D.DistInfo):
    """The per-batch step ``step(model, images, labels) -> loss``: a ``GraphedTrainStep`` where
    :func:`uses_cuda_graph`, else the eager ``train_step`` (CPU, two GPUs, torchrun)."""
    kw = {"bf16": config.bf16, "channels_last": config.channels_last, "output_device": model.output_device}
    if not uses_cuda_graph(config, devices, info):
        return lambda model_, images, labels: train_step(model_, optimizer, images, labels, **kw)
    graphed = GraphedTrainStep(model, optimizer, **kw)
    return lambda _model, images, labels: graphed(images, labels)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader,
    *,
    ten_crop: bool = False,
    bf16: bool = False,
    channels_last: bool = False,
    info: D.DistInfo | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Top-1 and top-5 error over every record of the loader's split (summed over replicas).

    Centre crop: batches [B, 3, 224, 224]. Ten patches (§4.1): batches [B, 10, 3, 224, 224]; the
    softmax outputs of an image's ten patches are averaged before ranking.
    """
    from tqdm import tqdm

    info = info or D.DistInfo()
    net = D.unwrap(model)
    was_training = net.training
    net.eval()
    correct1 = correct5 = seen = 0
    try:
        bar = tqdm(
            total=len(loader), desc="ten-patch eval" if ten_crop else "eval", unit="batch", leave=False,
            disable=not (progress and info.is_main), file=sys.stderr, dynamic_ncols=True,
        )  # fmt: skip
        for images, labels in loader:
            if ten_crop:
                if images.dim() != 5 or images.shape[1] != C.TEN_CROP:
                    raise AlexnetError(f"ten-patch evaluation needs [B, 10, 3, H, W] batches, got {list(images.shape)}")
                b = images.shape[0]
                images = images.reshape(b * C.TEN_CROP, *images.shape[2:])
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=images.device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = net(images)
            probs = average_patch_softmax(logits, C.TEN_CROP) if ten_crop else torch.softmax(logits.float(), dim=1)
            c1, c5 = topk_correct(probs, labels)
            correct1 += c1
            correct5 += c5
            seen += probs.shape[0]
            bar.update(1)
        bar.close()
    finally:
        net.train(was_training)
    device = net.output_device if getattr(net, "output_device", None) is not None else torch.device("cpu")
    correct1, correct5, seen = D.all_reduce_sum([correct1, correct5, seen], info, _collective_device(device))
    if seen == 0:
        raise AlexnetError("the validation split gave no images")
    return {"top1_err": 1.0 - correct1 / seen, "top5_err": 1.0 - correct5 / seen, "images": int(seen)}


def _collective_device(device: torch.device) -> torch.device:
    # gloo reduces CPU tensors, NCCL CUDA tensors.
    return device if device.type == "cuda" else torch.device("cpu")


# --------------------------------------------------------------------------- run-directory writers


class MetricsLog:
    """``metrics.jsonl`` (append, flushed per line) and, if tensorboardX is importable, TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool, t0: float, elapsed_before: float = 0.0,
                 resume_step: int | None = None) -> None:  # fmt: skip
        # elapsed_s counts the run's whole training time: a resumed run adds the killed run's time.
        # resume_step: the checkpoint's step; TensorBoard drops the killed run's later events
        # (purge_step), as _truncate_metrics drops its later metrics lines.
        self.enabled, self.t0, self.elapsed_before = enabled, t0, elapsed_before
        self.path = run_dir / METRICS_FILE
        self.tb = None
        self.note = ""
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", buffering=1)  # noqa: SIM115 - closed in close()
        try:
            from tensorboardX import SummaryWriter  # a dependency; a broken install only loses TensorBoard
        except ImportError:
            self.note = "note: tensorboardX is not importable, TensorBoard logs skipped (pip install tensorboardX)"
        else:
            purge = None if resume_step is None else resume_step + 1
            # tensorboardX names files by the second and the host: a nanosecond suffix keeps a resumed
            # run's file apart from the killed run's (and after it in name order, as TensorBoard reads them).
            self.tb = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=purge, flush_secs=30,
                                    filename_suffix=f".{time.time_ns()}")  # fmt: skip

    def write(self, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {**rec, "elapsed_s": round(self.elapsed(), 3), "time": round(time.time(), 3)}
        self.file.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            step = rec.get("step", 0)
            if rec.get("kind") == "train":
                for key in ("loss", "lr", "images_per_s"):
                    self.tb.add_scalar(f"train/{key}", rec[key], step)
                for group in ("weight_norm", "grad_norm"):
                    for layer, value in rec.get(group, {}).items():
                        self.tb.add_scalar(f"{group}/{layer}", value, step)
            elif rec.get("kind") == "alert":
                self.tb.add_text(f"alert/{rec['alert']}", rec["message"], step)
            else:
                tag = f"{rec.get('split', 'val')}{'_ten_crop' if rec.get('ten_crop') else ''}"
                for key in ("top1_err", "top5_err"):
                    self.tb.add_scalar(f"{tag}/{key}", rec[key], step)

    def elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self.t0

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop lines the killed run wrote after the checkpoint (they will be redone)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a half-written last line from the kill
        if int(rec.get("step", 0)) <= step:
            kept.append(line)
    atomic_write_bytes(path, ("\n".join(kept) + "\n" if kept else "").encode())


def default_run_dir() -> Path:
    return RUNS_DIR / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")


# --------------------------------------------------------------------------- the run


@dataclass
class _State:
    epoch: int = 0  # completed epochs
    step: int = 0  # optimiser steps done
    batch_in_epoch: int = 0  # steps done in the current epoch
    best_top1_err: float | None = None
    last_eval: dict[str, Any] = field(default_factory=dict)
    elapsed_before: float = 0.0  # seconds the run had taken before this process resumed it
    images: int = 0  # images trained on in this process (for the mean rate)
    train_seconds: float = 0.0


def _say(info: D.DistInfo, msg: str) -> None:
    if info.is_main:
        print(msg, file=sys.stderr, flush=True)


def train(config: TrainConfig, *, on_step=None, on_end=None) -> dict[str, Any]:
    """Train (or resume) one run; returns a summary dict.

    Hooks for tests: ``on_step(step, epoch, labels)`` sees every batch's labels on this replica (it
    may raise to simulate a kill); ``on_end(model)`` gets this replica's network after the last step.
    """
    from tqdm import tqdm

    from .model import AlexNet

    t0 = time.monotonic()
    info, gpus, devices, device_note = _start_replica(config)
    try:
        with StopSignals() as signals:  # SIGTERM, SIGUSR1, Ctrl-C: stop after the step, with a checkpoint
            return _train(config, info, gpus, devices, device_note, t0, on_step, on_end, AlexNet, tqdm, signals)
    finally:
        D.destroy_process_group()


def _train(config, info, gpus, devices, device_note, t0, on_step, on_end, AlexNet, tqdm, signals) -> dict[str, Any]:
    coll_device = _collective_device(devices[0])
    if config.batch_size % info.world_size:
        raise AlexnetError(
            f"--batch-size {config.batch_size} is the global batch and must divide evenly over "
            f"{info.world_size} replicas"
        )
    data_dir = Path(config.data_dir)
    manifest = read_manifest(data_dir)
    num_classes = len(manifest.classes)
    if "train" not in manifest.splits:
        raise AlexnetError(f"the dataset at {data_dir} has no train split")

    run_dir = Path(config.run_dir) if config.run_dir else default_run_dir()
    run_dir = Path(D.broadcast_object(str(run_dir), info))
    ckpt_dir = run_dir / ckpt_io.CHECKPOINT_DIR
    last_path = ckpt_dir / ckpt_io.LAST
    fresh_after_resume = config.resume and not last_path.exists()
    if fresh_after_resume:  # a requeued job that always passes --resume, preempted before its first checkpoint
        _say(info, f"nothing to resume at {last_path}: starting the run")
        config = config.replace(resume=False)
    if not config.resume and last_path.exists():
        raise AlexnetError(
            f"{run_dir} already holds a run (checkpoints/last.pt): add --resume to continue it, "
            "or choose another --run-dir"
        )
    # Pipelines per replica, recorded in config.json so that a resume rebuilds the same loaders:
    # auto is 2 on a GPU, 1 on the CPU; a run saved before the option existed had 1.
    pipelines = config.pipelines or (1 if config.resume else auto_pipelines(devices[0]))
    config = config.replace(run_dir=str(run_dir), gpus=gpus, num_classes=num_classes, pipelines=pipelines)
    if devices[0].type == "cuda":
        torch.backends.cudnn.benchmark = True  # fastest algorithms for the fixed 224x224 shapes
    _say(
        info,
        device_note
        + (f"; {info.world_size} replicas (torchrun)" if info.enabled else "")
        + ("; each step replayed as one CUDA graph" if uses_cuda_graph(config, devices, info) else ""),
    )

    # §5 init: seeded, identical on every replica (DDP also broadcasts rank 0's weights).
    _seed_everything(config.seed)
    model = AlexNet(num_classes=num_classes, devices=devices, lrn=config.lrn)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if info.rank:
        _seed_everything(_replica_seed(config.seed, info.rank))
    optimizer = create_optimizer(model, config.lr, config.momentum, config.weight_decay)
    schedule = create_schedule(config)
    train_loader = create_loader_for(config, "train", devices[0], info)
    val_loader = None
    state = _State()
    watch = LossWatch(num_classes, config.stall_intervals, config.stall_band, config.explode_factor)
    channel_mean = read_stats(data_dir).mean_rgb if config.mean == "channel" else None  # what the pipeline subtracts
    inference_entry = ckpt_io.dataset_entry(manifest, read_mean_image(data_dir), channel_mean) if info.is_main else None

    if config.resume:
        ck = ckpt_io.load_checkpoint(last_path)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        try:
            schedule.load_state_dict(ck["schedule"])
        except ValueError as e:
            raise AlexnetError(f"{last_path}: {e}") from None
        state.epoch, state.step, state.batch_in_epoch = int(ck["epoch"]), int(ck["step"]), int(ck["batch_in_epoch"])
        state.best_top1_err = ck.get("best_top1_err")
        state.last_eval = dict(ck.get("last_eval") or {})
        state.elapsed_before = float(ck.get("elapsed_s") or 0.0)
        watch.load_state_dict(ck.get("loss_watch") or {})
        # The loader's position (epoch, records consumed, seed) is the same on every replica and
        # continues the epoch's permutation with any replica count; dropout RNGs are per replica.
        train_loader.load_state_dict(ck["ranks"][0]["loader"])
        if int(ck["world_size"]) == info.world_size:
            ckpt_io.set_rng_state(ck["ranks"][info.rank]["rng"])
        else:
            _seed_everything(_replica_seed(config.seed, info.rank, state.step))
        if train_loader.note:  # the buffer shuffle, or a state of an older version: the epoch restarts
            _say(info, f"note: {train_loader.note}")
            state.batch_in_epoch = 0
        _say(info, f"resumed {last_path} at step {state.step} (epoch {state.epoch}, +{state.batch_in_epoch} batches)")

    ddp_model = D.wrap_ddp(model, info)
    ddp_model.train()
    step_fn = make_step(model, optimizer, config, devices, info)

    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir / CONFIG_FILE)
        atomic_write_json(run_dir / VERSIONS_FILE, versions())
        if config.resume or fresh_after_resume:  # drop lines written after the checkpoint (or with none)
            _truncate_metrics(run_dir / METRICS_FILE, state.step)
    metrics = MetricsLog(run_dir, info.is_main, t0, state.elapsed_before,
                         resume_step=state.step if config.resume else None)  # fmt: skip
    if metrics.note:
        _say(info, metrics.note)

    def save(reason: str, *, epoch_end: bool = False, is_best: bool = False) -> None:
        per_rank = D.all_gather_objects({"rng": ckpt_io.rng_state(), "loader": train_loader.state_dict()}, info)
        if not info.is_main:
            return
        payload = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "epoch": state.epoch,
            "step": state.step,
            "batch_in_epoch": state.batch_in_epoch,
            "world_size": info.world_size,
            "ranks": per_rank,
            "config": config.to_dict(),
            "best_top1_err": state.best_top1_err,
            "last_eval": state.last_eval,
            "elapsed_s": state.elapsed_before + time.monotonic() - t0,
            "loss_watch": watch.state_dict(),
            "dataset": inference_entry,  # classes, names, mean image: predict and export need no --data-dir
            "reason": reason,
        }
        if epoch_end:
            epoch_path = ckpt_dir / ckpt_io.epoch_name(state.epoch)
            ckpt_io.save_checkpoint(epoch_path, payload)
            _link_or_copy(epoch_path, last_path)
            if is_best:
                _link_or_copy(epoch_path, ckpt_dir / ckpt_io.BEST)
            if config.keep_epochs:
                ckpt_io.prune_epoch_checkpoints(ckpt_dir, config.keep_epochs)
        else:
            ckpt_io.save_checkpoint(last_path, payload)

    batch_global = config.batch_size
    stop_reason = ""
    last_ckpt_time = time.monotonic()
    loss_sum = torch.zeros((), device=model.output_device)
    loss_steps = 0
    last_log_time, last_log_step = time.monotonic(), state.step
    last_loss = float("nan")
    last_good_step = state.step

    epoch_len = [1]  # steps in the current epoch (set per epoch)
    bar = None

    def check_and_log(bar) -> tuple[bool, bool, bool]:
        """At a log point: loss mean, rate, and the collective checkpoint/time-limit/signal decisions."""
        nonlocal loss_sum, loss_steps, last_log_time, last_log_step, last_loss, last_ckpt_time, last_good_step
        mean_loss = (loss_sum / max(loss_steps, 1)).item()
        now = time.monotonic()
        flags = [
            0.0 if math.isfinite(mean_loss) else 1.0,
            1.0 if config.checkpoint_minutes and now - last_ckpt_time >= 60 * config.checkpoint_minutes else 0.0,
            1.0 if config.time_limit_minutes and now - t0 >= 60 * config.time_limit_minutes else 0.0,
            1.0 if signals.received else 0.0,  # one replica's signal stops them all at this step
        ]
        if info.enabled:
            t = torch.tensor(flags, device=coll_device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flags = t.tolist()
        if flags[0]:
            raise NonFiniteLoss(
                f"the loss became {'nan' if math.isnan(mean_loss) else mean_loss} between steps "
                f"{last_log_step + 1} and {state.step}; stopped. The last good checkpoint is kept: "
                f"{last_path if last_path.exists() else '(none written yet)'} (step {last_good_step}). "
                "Lower --lr, or check the data."
            )
        rate = batch_global * (state.step - last_log_step) / max(now - last_log_time, 1e-9)
        last_loss = mean_loss
        metrics.write(
            {
                "kind": "train", "step": state.step, "epoch": state.epoch,
                "epoch_progress": round(state.batch_in_epoch / epoch_len[0], 4), "loss": mean_loss, "lr": schedule.lr,
                "images_per_s": round(rate, 2), **(layer_norms(model, LEARNED_LAYERS) if info.is_main else {}),
            }
        )  # fmt: skip
        for alert in watch.observe(state.step, mean_loss):
            _say(info, alert["message"])
            metrics.write(alert)
        if bar is not None:
            bar.set_postfix({"img/s": f"{rate:.0f}", "loss": f"{mean_loss:.4f}", "lr": f"{schedule.lr:g}"})
        loss_sum = torch.zeros((), device=model.output_device)
        loss_steps = 0
        last_log_time, last_log_step = now, state.step
        return bool(flags[1]), bool(flags[2]), bool(flags[3])

    def flush_pending() -> None:
        """Before a checkpoint: make sure no non-finite loss happened since the last log point."""
        if loss_steps:
            check_and_log(None)

    def mark_saved() -> None:
        nonlocal last_ckpt_time, last_good_step
        last_ckpt_time = time.monotonic()
        last_good_step = state.step

    def max_steps_reached() -> bool:
        return bool(config.max_steps) and state.step >= config.max_steps

    try:
        while not stop_reason:
            if config.epochs and state.epoch >= config.epochs:
                stop_reason = "epochs"
                break
            if schedule.done:
                stop_reason = "schedule"
                break
            if max_steps_reached():
                stop_reason = "max_steps"
                break
            set_lr(optimizer, schedule.start_epoch(state.epoch))
            # len(loader): the batches left from the loader's position (all of them at an epoch's start).
            steps_this_epoch = state.batch_in_epoch + D.all_reduce_min_int(len(train_loader), info, coll_device)
            if steps_this_epoch < 1:
                raise AlexnetError(
                    f"the training split has fewer records per replica than one batch of {batch_global // info.world_size}"
                )
            epoch_len[0] = steps_this_epoch
            if bar is None or not config.max_steps:
                # With --max-steps one bar spans the run (its ETA is the run's); else one bar per epoch.
                total, done = (
                    (config.max_steps, state.step) if config.max_steps else (steps_this_epoch, state.batch_in_epoch)
                )
                bar = tqdm(
                    total=total, initial=done, unit="step", dynamic_ncols=True,
                    desc="steps" if config.max_steps else f"epoch {state.epoch + 1}" + (f"/{config.epochs}" if config.epochs else ""),
                    disable=not (config.progress and info.is_main), file=sys.stderr,
                )  # fmt: skip
            epoch_t0 = time.monotonic()
            epoch_steps0 = state.step
            for images, labels in train_loader:
                if state.batch_in_epoch >= steps_this_epoch:
                    continue  # a replica with more batches than the others drains them (DDP needs equal counts)
                loss = step_fn(ddp_model, images, labels)
                loss_sum += loss
                loss_steps += 1
                state.step += 1
                state.batch_in_epoch += 1
                bar.update(1)
                if on_step is not None:
                    on_step(state.step, state.epoch, labels)
                want_ckpt = time_up = stopped = False
                if state.step % config.log_every_steps == 0:
                    want_ckpt, time_up, stopped = check_and_log(bar)
                elif not info.enabled:
                    stopped = signals.received is not None  # one process: stop after this step
                if config.checkpoint_every_steps and state.step % config.checkpoint_every_steps == 0:
                    want_ckpt = True
                at_epoch_end = state.batch_in_epoch >= steps_this_epoch
                if at_epoch_end:
                    continue  # the epoch-end checkpoint follows; let the loader finish its epoch
                if want_ckpt:
                    flush_pending()
                    save("periodic")
                    mark_saved()
                if time_up or stopped or max_steps_reached():
                    stop_reason = "time_limit" if time_up else "signal" if stopped else "max_steps"
                    break
            if not config.max_steps or stop_reason:
                bar.close()
            state.train_seconds += time.monotonic() - epoch_t0
            state.images += (state.step - epoch_steps0) * batch_global
            if stop_reason:
                flush_pending()
                save(stop_reason)
                mark_saved()
                break

            # ---- epoch end: evaluation, schedule, checkpoints
            flush_pending()
            state.epoch += 1
            state.batch_in_epoch = 0
            is_best = False
            if "val" in manifest.splits and state.epoch % config.eval_every_epochs == 0:
                if val_loader is None:
                    val_loader = create_loader_for(config, "val", devices[0], info)
                res = evaluate(
                    ddp_model, val_loader, bf16=config.bf16, channels_last=config.channels_last,
                    info=info, progress=config.progress,
                )  # fmt: skip
                state.last_eval = res
                metrics.write(
                    {"kind": "eval", "split": "val", "ten_crop": False, "step": state.step, "epoch": state.epoch, **res}
                )
                is_best = state.best_top1_err is None or res["top1_err"] < state.best_top1_err
                if is_best:
                    state.best_top1_err = res["top1_err"]
                event = schedule.observe(res["top1_err"])
                _say(
                    info,
                    f"epoch {state.epoch}: val top-1 error {100 * res['top1_err']:.2f}%, "
                    f"top-5 {100 * res['top5_err']:.2f}% (centre crop, {res['images']} images), lr {schedule.lr:g}"
                    + (
                        {"drop": " -> divided by 10 (plateau)", "done": " -> stalled after the last drop: stop"}.get(
                            event or "", ""
                        )
                    ),
                )
            save("epoch", epoch_end=True, is_best=is_best)
            mark_saved()
            # time limit or a signal at an epoch boundary: agreed collectively
            if config.time_limit_minutes and D.any_flag(
                time.monotonic() - t0 >= 60 * config.time_limit_minutes, info, coll_device
            ):
                stop_reason = "time_limit"
            elif D.any_flag(signals.received is not None, info, coll_device):
                stop_reason = "signal"
    finally:
        if bar is not None:
            bar.close()  # the run-wide bar (closing twice is harmless)
        metrics.close()

    if on_end is not None:
        on_end(model)
    summary = {
        "run_dir": str(run_dir),
        "gpus": gpus,
        "world_size": info.world_size,
        "stop_reason": stop_reason,
        "signal": signals.received,  # the signal this process received, when stop_reason is "signal"
        "steps": state.step,
        "epochs_completed": state.epoch,
        "final_loss": last_loss,
        "lr": schedule.lr,
        "val_top1_err": state.last_eval.get("top1_err"),
        "val_top5_err": state.last_eval.get("top5_err"),
        "best_top1_err": state.best_top1_err,
        "images_per_s": state.images / state.train_seconds if state.train_seconds else None,
        "elapsed_s": time.monotonic() - t0,
        "checkpoint": str(last_path),
    }
    return summary


def _link_or_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` the same file as ``src`` atomically (hard link, else a copy), never half-written."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        import shutil

        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


# --------------------------------------------------------------------------- evaluation of a checkpoint


def evaluate_checkpoint(config: TrainConfig, checkpoint: Path, *, ten_crop: bool) -> dict[str, Any]:
    """``--eval-only``: centre-crop (and, with ``ten_crop``, ten-patch) error of a checkpoint on val.

    Logged to ``RUN/metrics.jsonl`` when a run directory is given (or the checkpoint sits in one).
    """
    from .model import AlexNet

    t0 = time.monotonic()
    info, gpus, devices, note = _start_replica(config)
    try:
        _say(info, note)
        manifest = read_manifest(Path(config.data_dir))
        if "val" not in manifest.splits:
            raise AlexnetError(f"the dataset at {config.data_dir} has no val split")
        ck = ckpt_io.load_checkpoint(checkpoint)
        model = AlexNet.from_checkpoint(ck, devices=devices)
        if model.num_classes != len(manifest.classes):
            raise AlexnetError(
                f"{checkpoint} was trained on {model.num_classes} classes, the dataset has {len(manifest.classes)}"
            )
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        per_replica = max(config.batch_size // info.world_size, 1)
        results: dict[str, Any] = {"checkpoint": str(checkpoint), "step": ck.get("step"), "epoch": ck.get("epoch")}
        run_dir = Path(config.run_dir) if config.run_dir else None
        if run_dir is None and Path(checkpoint).resolve().parent.name == ckpt_io.CHECKPOINT_DIR:
            run_dir = Path(checkpoint).resolve().parent.parent
        metrics = MetricsLog(run_dir, info.is_main, t0) if run_dir is not None else None
        for ten in (False, True) if ten_crop else (False,):
            loader = create_loader_for(config, "val", devices[0], info, ten_crop=ten, batch_size=per_replica)
            res = evaluate(
                model, loader, ten_crop=ten, bf16=config.bf16, channels_last=config.channels_last, info=info,
                progress=config.progress,
            )  # fmt: skip
            results["ten_crop" if ten else "centre_crop"] = res
            if metrics is not None:
                metrics.write(
                    {
                        "kind": "eval",
                        "split": "val",
                        "ten_crop": ten,
                        "step": ck.get("step"),
                        "epoch": ck.get("epoch"),
                        **res,
                    }
                )
        if metrics is not None:
            metrics.close()
        return results
    finally:
        D.destroy_process_group()


# --------------------------------------------------------------------------- benchmark


def benchmark(config: TrainConfig, *, warmup: int = 3, steps: int = 10) -> dict[str, Any]:
    """Training images/s with synthetic batches (already on the device) and with the real
    pipeline's batches, same model and step; the ratio says whether the pipeline starves the model."""
    from .model import AlexNet

    info = D.dist_info_from_env()
    gpus, devices, note = resolve_gpus(config.gpus, info)
    manifest = read_manifest(Path(config.data_dir))
    num_classes = len(manifest.classes)
    _seed_everything(config.seed)
    model = AlexNet(num_classes=num_classes, devices=devices, lrn=config.lrn)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if devices[0].type == "cuda":
        torch.backends.cudnn.benchmark = True
    model.train()
    optimizer = create_optimizer(model, config.lr, config.momentum, config.weight_decay)
    b = config.batch_size
    step_fn = make_step(model, optimizer, config, devices, info)
    if uses_cuda_graph(config, devices, info):
        warmup = max(warmup, GRAPH_EAGER_STEPS + 2)  # the eager steps and the capture stay out of the timing

    def timed(batches) -> float:
        it = iter(batches)
        for _ in range(warmup):
            images, labels = next(it)
            step_fn(model, images, labels)
        _sync(devices)
        start = time.perf_counter()
        last = None
        for _ in range(steps):
            images, labels = next(it)
            last = step_fn(model, images, labels)
        float(last)  # wait for the last step
        _sync(devices)
        return steps * b / (time.perf_counter() - start)

    gen = torch.Generator().manual_seed(config.seed)
    images = torch.randn(b, 3, C.CROP_SIZE, C.CROP_SIZE, generator=gen).mul_(50).to(devices[0])
    labels = torch.randint(0, num_classes, (b,), generator=gen).to(devices[0])

    def synthetic():
        while True:
            yield images, labels

    synthetic_ips = timed(synthetic())
    loader = create_loader_for(config, "train", devices[0], info, batch_size=b)
    if len(loader) < 1:
        raise AlexnetError(f"the training split has fewer records than one batch of {b}")

    def pipeline_batches():
        while True:  # across epoch ends when the split is small
            yield from loader

    real_ips = timed(pipeline_batches())
    return {
        "gpus": gpus,
        "device_note": note,
        "batch_size": b,
        "bf16": config.bf16,
        "channels_last": config.channels_last,
        "cuda_graph": uses_cuda_graph(config, devices, info),
        "warmup_steps": warmup,
        "timed_steps": steps,
        "synthetic_images_per_s": synthetic_ips,
        "pipeline_images_per_s": real_ips,
        "ratio": real_ips / synthetic_ips,
    }
