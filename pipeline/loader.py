"""The PyTorch-facing iterator over the DALI pipelines: a fresh shuffle every epoch, exact epochs, resumable.

    data = DataConfig()                  # the user's data settings (the run config's ``data`` section)
    loader = create_loader(data_dir, "train", data, batch_size=128, seed=0, device="cuda:0")
    for images, labels in loader:        # one epoch: len(loader) batches
        ...
    state = loader.state_dict()          # {"version", "epoch", "consumed", "seed", ...}: plain, the same on every replica
    loader.load_state_dict(state)        # the next batch is the one an uninterrupted run would get

Order (``shuffle="global"``, the default): each epoch's permutation, each replica's strided share of
it and every image's draws are those of pipeline/order.py; the records are read from LMDB by key and
handed to DALI with their draws, in DALI's reader processes (``workers`` per pipeline, spawned: the
thread that drives training only runs the pipeline; ``workers=0`` reads on it, the same bits). The job's position is (epoch, records consumed in it), so a state
saved with one replica count (or pipeline count) resumes with another on the same permutation.

Pipelines. With ``pipelines=K`` pipeline ``j`` prepares the replica's batches ``j, j + K, ...`` and
the loader takes them in turn: the delivered stream is the same for every K. On a GPU one pipeline
decodes one batch at a time; K of them keep the hardware decoder busy (``benchmarks/
results_pipeline.md``: 1.2-1.4x the rate with K=2 on an H100).

``shuffle="buffer"`` keeps the sequential caffe reader (docs/DEVIATIONS.md A4): one pipeline per
replica over its contiguous part of the shards, rebuilt every epoch with a seed of (seed, epoch, rank);
a resume with the same replica count replays the epoch's consumed batches, with another it restarts
the epoch.
"""

from __future__ import annotations

import os
import signal
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import artifacts as A
from . import columns as K
from . import constants as C
from . import order as O
from .cli_common import field_problems, opt
from .dali_pipeline import PipelineSpec, create_pipeline, record_positions
from .errors import AlexnetError

SHUFFLES = ("global", "buffer")
STATE_VERSION = 2  # the loader state's version in checkpoints; another is refused in one line


@dataclass(frozen=True)
class DataConfig:
    """The user's data-loading settings, each default written once here (the run config's ``data`` section)."""

    num_threads: int = opt(4, "DALI CPU threads per pipeline.", min=1, aliases=("--threads",))
    # Two reader processes per pipeline: one reads a batch while the other's waits in DALI's queue; a
    # batch of 128 costs one of them ~1-2 ms warm (benchmarks/bench_feed_thread.py), so at 2 pipelines
    # x 2 they keep up with ~30,000 img/s; more help only reads from a cold page cache. Spawning them
    # costs ~2 s per pipeline build.
    workers: int = opt(
        2,
        "Processes per pipeline that read and parse the records (global shuffle, val); 0: on the training thread.",
        min=0,
    )
    prefetch: int = opt(3, "Batches each pipeline prepares ahead (3 keeps an H100 fed).", min=1)
    hw_decoder_load: float = opt(
        0.9, "GPU: share of JPEGs for the hardware decoder (DALI's default 0.65; 0.9 measured best).", min=0, max=1
    )
    pipelines: int = opt(
        0, "DALI pipelines per replica, taken in turn (0: 2 on a GPU, 1 on the CPU; buffer shuffle: 1).", min=0
    )
    decoder: str = opt(
        "auto",
        "JPEG decoding: auto = nvJPEG ('mixed') on a GPU; 'cpu' decodes on the host.",
        choices=("auto", "mixed", "cpu"),
    )
    roi_decode: bool = opt(False, "Decode only the 224 crop window when training (same pixels).")
    mean: str = opt("image", "Subtract the mean image (§2) or the per-channel mean.", choices=("image", "channel"))
    lighting_scale: str = opt(
        C.DEFAULT_LIGHTING_SCALE, "§4.1 PCA lighting convention (docs/DEVIATIONS.md A2).", choices=C.LIGHTING_SCALES
    )
    shuffle: str = opt(
        "global",
        "global: a fresh permutation of the split every epoch (random reads); buffer: the sequential "
        "reader through a 4,096-record shuffle buffer, for data beyond page cache (README).",
        choices=SHUFFLES,
    )

    def __post_init__(self) -> None:
        problems = field_problems(self)
        if problems:
            raise AlexnetError("invalid data config: " + "; ".join(problems))

    def resolved_pipelines(self, device: str) -> int:
        """Pipelines per replica on ``device`` (see ``pipelines``; on a GPU one cannot feed an H100)."""
        if self.shuffle == "buffer":
            return 1
        return self.pipelines or (2 if device.startswith("cuda") else 1)


def device_id_for(device: str) -> int | None:
    """DALI's device_id for a torch device string; None (CPU-only mode) for the CPU."""
    if device == "cpu":
        return None
    if device.startswith("cuda"):
        _, _, index = device.partition(":")
        return int(index or 0)
    raise AlexnetError(f"unknown device {device!r} (use 'cpu' or 'cuda:N')")


class _Source:
    """``fn.external_source`` callback of pipeline ``j`` of ``k``: the replica's batches ``j, j + k, ...``
    counted from (epoch, consumed), read from LMDB, with their draws, packed by pipeline/columns.py.
    DALI calls it with 0, 1, 2, ... (never StopIteration: it runs ahead across epochs' ends, as far
    as its prefetch queue).

    A pure function of the iteration, so DALI may call it in its reader processes (``workers``): it
    is pickled into each, where the index opens its own LMDB environments on the first read.
    """

    def __init__(self, plan: O.ReplicaPlan, epoch: int, consumed: int, j: int, k: int):
        self.plan, self.epoch, self.consumed, self.j, self.k = plan, epoch, consumed, j, k
        self.columns = K.batch_columns(plan.training)  # pickled with it: the reader processes pack the same
        self.parent = os.getpid()  # the training process (the reader processes' parent)

    def __setstate__(self, state: dict) -> None:
        """Unpickled in a reader process: it dies with the process that trains (killed, OOM included),
        where DALI's readers would wait for tasks for ever."""
        self.__dict__.update(state)
        if sys.platform.startswith("linux"):
            import ctypes

            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
            # The parent died before that. (Not "ppid == 1": in a container the trainer may be PID 1.)
            if os.getppid() != self.parent:
                os._exit(1)

    def __call__(self, iteration: int):
        t = self.j + iteration * self.k  # the batch's place in the replica's stream
        epoch, consumed, first = self.epoch, self.consumed, self.plan.steps(self.consumed)
        if t >= first:  # a later epoch, read from its start
            later, t = divmod(t - first, self.plan.steps(0))  # full epochs in between, and the batch
            epoch, consumed = epoch + 1 + later, 0
        positions = self.plan.batch(epoch, consumed, t)
        jpegs, lengths, labels = self.plan.index.read(positions)
        values = {"length": lengths, "label": labels, "index": positions}
        if self.plan.training:
            draws = self.plan.draws(epoch)
            values |= {c.name: getattr(draws, c.name)[positions] for c in self.columns if c.draw}
        return jpegs, *K.pack(self.columns, values)


class DaliLoader:
    """The loader of one split for replica ``rank`` of ``world``: ``batch_size`` images per batch on this
    replica (§5's 128 is the global batch: the caller divides it), delivered on ``device`` in ``dtype``
    ("float32" | "float16": written by DALI | "bfloat16": DALI has none, one cast from float32 on the
    device); ``channels_last``: NCHW-shaped images in channels_last memory (DALI writes HWC, torch
    views it: no copy; the step's layout), else NCHW-contiguous; ``ten_crop`` (val): [B, 10, 3, 224,
    224] (channels last within each patch); ``with_draws``: also a dict of record positions (+ train:
    the draws); ``stats``: ``(mean image, Stats)`` to use instead of the dataset's (a test set without a
    train split has no stats of its own: evaluation takes the checkpoint's mean)."""

    def __init__(
        self,
        data_dir: Path,
        split: str,
        data: DataConfig,
        *,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        device: str = "cpu",
        dtype: str = "float32",
        channels_last: bool = False,
        ten_crop: bool = False,
        with_draws: bool = False,
        stats: tuple[np.ndarray, A.Stats] | None = None,
    ):
        if split not in A.SPLITS:
            raise AlexnetError(f"unknown split {split!r}; choose one of {A.SPLITS}")
        if batch_size < 1 or not 0 <= rank < world:
            raise AlexnetError(f"batch_size must be >= 1 and rank {rank} in [0, {world})")
        if dtype not in ("float32", "float16", "bfloat16"):
            raise AlexnetError(f"dtype must be float32, float16 or bfloat16, not {dtype!r}")
        self.is_training = split == "train"
        if ten_crop and self.is_training:
            raise AlexnetError("ten_crop is for the validation split")
        self.data_dir, self.split, self.data = Path(data_dir), split, data
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.device, self.dtype, self.with_draws = device, dtype, with_draws
        self.columns = K.batch_columns(self.is_training)  # what a batch carries beside its images, by name
        self.index = O.SplitIndex(self.data_dir, split)  # reads the manifest: "no dataset" is the first error
        if stats is None:
            stats = A.read_mean_image(self.data_dir), A.read_stats(self.data_dir)
        self.mean_image, self.stats = stats
        self.num_records = len(self.index)  # records in the split (all replicas)
        self.buffer = data.shuffle == "buffer" and self.is_training
        self.plan = O.ReplicaPlan(self.index, seed, rank, world, batch_size, self.is_training)
        self.spec = PipelineSpec(
            data=data,
            is_training=self.is_training,
            batch_size=batch_size,
            device_id=device_id_for(device),
            dtype="float32" if dtype == "bfloat16" else dtype,
            channels_last=channels_last,
            ten_crop=ten_crop,
            seed=seed,
            reader=(tuple(str(p) for p in self.index.shard_paths), rank, world) if self.buffer else None,
        )
        self.num_pipelines = data.resolved_pipelines(device)
        if self.is_training and self._steps(0) < 1:
            raise AlexnetError(
                f"the {split} split has {self.num_records} records, fewer than one batch of {batch_size} "
                f"on each of {world} replica(s)"
            )
        self.epoch = 0  # epochs completed
        self.consumed = 0  # records the whole job consumed in the current epoch
        self.note = ""  # what a loaded state costs in buffer mode (a replay, or a restart), for the caller to say
        self._pipes: list = []
        self._turn = 0  # batches taken from the pipelines since they were built
        # GPU: the last batch's DALI outputs (the buffers its tensors alias) and the stream they went to,
        # then (event, outputs) held until that stream has passed the event (``_stream``).
        self._last: tuple | None = None
        self._held: deque = deque()
        # bfloat16: shape -> a preallocated bfloat16 tensor for the cast to write into, or None (the
        # trainer gives its step's static_input: a CUDA graph's input buffer, so one pass instead of two).
        self.static_input = None

    # ------------------------------------------------------------------ size
    def _steps(self, consumed: int) -> int:
        if self.buffer:  # the smallest part of the caffe reader's sharding, in full batches, for all replicas
            return (self.num_records // self.world) // self.batch_size - consumed // self.global_batch
        return self.plan.steps(consumed)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    def __len__(self) -> int:
        """Batches left in the current epoch (all of them at its start); the same on every replica in training."""
        return self._steps(self.consumed)

    # ------------------------------------------------------------------ pipelines
    def _build(self) -> None:
        """Pipelines that start at the current position (the buffer mode's: at the epoch's start)."""
        if self.buffer:
            # A seed of (seed, epoch, rank): the reader's shuffle and the draws differ per epoch and replica.
            seed = int(np.random.SeedSequence([self.seed, self.epoch, self.rank]).generate_state(1)[0] >> 1)
            spec = PipelineSpec(**{**self.spec.__dict__, "seed": seed})
            self._pipes = [create_pipeline(spec, self.mean_image, self.stats)]
        else:
            k = self.num_pipelines
            sources = [_Source(self.plan, self.epoch, self.consumed, j, k) for j in range(k)]
            self._pipes = [create_pipeline(self.spec, self.mean_image, self.stats, source) for source in sources]
        for pipe in self._pipes:
            pipe.build()
        self._turn = 0
        if self.buffer:  # replay the batches the job consumed in this epoch (the same replica count)
            for _ in range(self.consumed // self.global_batch):
                self._pipes[0].run()

    def _drop(self) -> None:
        self._pipes, self._turn = [], 0

    # ------------------------------------------------------------------ iteration
    def __iter__(self):
        """The remaining batches of the current epoch (all of them from a fresh or finished epoch)."""
        for _ in range(len(self)):
            if not self._pipes:
                self._build()
            outputs = self._run(self._pipes[self._turn % len(self._pipes)])  # the pipelines take turns
            self._turn += 1
            self.consumed = min(self.consumed + self.global_batch, self.num_records)
            yield self._delivered(outputs)
        self._next_epoch()

    def _run(self, pipe):
        """``pipe.run()``: on a GPU bound to the stream the caller's step runs on (DALI 2.4's
        ``run(cuda_stream)``, a positional argument), so that the stream waits for DALI's work and the
        host does not. When DALI fails on a batch: the record it could not decode, in one line."""
        stream = self._stream()
        try:
            outputs = pipe.run() if stream is None else pipe.run(stream)
        except RuntimeError as error:  # DALI's operator errors; the pipeline is unusable after one
            raise self._failure(error) from None
        if stream is not None:
            self._last = (outputs, stream)
        return outputs

    def _stream(self):
        """On a GPU: the current stream (the step's), after handing the last batch over. DALI's outputs
        (the buffers the delivered tensors alias, and the float32 batch a bfloat16 cast reads) stay
        alive until that stream has done what the caller enqueued on them before asking for this batch
        (the step): an event is recorded now, and they go once it has passed. Dropped at once, DALI
        could reuse a buffer that the cast or the step has yet to read. None on the CPU."""
        if self.spec.device_id is None:
            return None
        import torch

        if self._last is not None:
            outputs, stream = self._last
            event = torch.cuda.Event()
            event.record(stream)
            self._held.append((event, outputs))
            self._last = None
        while self._held and self._held[0][0].query():
            self._held.popleft()
        return torch.cuda.current_stream(torch.device(self.device))

    def _failure(self, error: RuntimeError) -> AlexnetError:
        """DALI's error on a batch as one line: the record PIL cannot decode either, else DALI's first line."""
        # The batch due, and every one DALI may have read ahead (its queue, and its readers').
        ahead = 1 + (self.data.prefetch + self.data.workers) * len(self._pipes)
        self._drop()
        culprit = None if self.buffer else self._undecodable(ahead)
        if culprit is None:  # the buffer shuffle's reader, or a record PIL decodes: DALI's first line
            first = next((line for line in str(error).splitlines() if line.strip()), "no message")
            return AlexnetError(
                f"the {self.split} pipeline failed: {first}; check the dataset: alexnet-prep verify "
                f"--data-dir {self.data_dir}"
            )
        (shard, key), reason = self.plan.index.where(culprit[0]), culprit[1]
        return AlexnetError(
            f"record {key.decode(errors='replace')!r} in shard {shard} is not a decodable image ({reason}); "
            f"check the dataset: alexnet-prep verify --data-dir {self.data_dir}"
        )

    def _undecodable(self, batches: int) -> tuple[int, str] | None:
        """(position, reason) of the first record PIL cannot decode in the replica's next ``batches``."""
        from .images import Rejected, decode_image

        for k in range(min(batches, len(self))):
            positions = self.plan.batch(self.epoch, self.consumed, k)
            for pos, jpeg in zip(positions.tolist(), O.unpacked(*self.plan.index.read(positions)[:2]), strict=True):
                try:
                    decode_image(jpeg.tobytes(), draft=False)
                except Rejected as e:
                    return pos, str(e)
        return None

    def _next_epoch(self) -> None:
        self.epoch += 1
        self.consumed = 0
        if self.buffer:
            self._drop()  # the next epoch's reader has its own seed

    def _delivered(self, outputs):
        """(images, labels), + the other columns by name (``draws``) if ``with_draws``."""
        named = dict(zip(("images", *K.output_names(self.columns)), outputs, strict=True))
        images = self._to_torch(named.pop("images"))
        if self.spec.channels_last:  # [..., H, W, C] as [..., C, H, W]: a view, channels_last memory
            images = images.movedim(-1, -3)
        if self.dtype == "bfloat16":
            images = self._as_bfloat16(images)
        labels = self._to_torch(named.pop("label")).reshape(-1)
        if not self.with_draws:
            return images, labels
        shapes = {c.name: c.shape for c in self.columns}
        draws = {
            name: record_positions(values)  # the buffer shuffle's source info
            if self.buffer and name == "index"
            else np.array(values.as_tensor()).reshape(-1, *shapes[name])
            for name, values in named.items()
        }
        return images, labels, draws

    def _as_bfloat16(self, images):
        """The one cast from DALI's float32 (DALI has no bfloat16): one pass on the device, keeping the
        memory format; written into ``static_input(shape)`` where that gives a tensor (the step's CUDA
        graph input: one pass instead of a cast and a copy)."""
        import torch

        target = self.static_input(tuple(images.shape)) if self.static_input is not None else None
        if target is None:
            return images.to(torch.bfloat16)
        if (target.dtype, target.shape, target.device) != (torch.bfloat16, images.shape, images.device):
            raise ValueError(f"static_input gave {target.dtype} {tuple(target.shape)} for {tuple(images.shape)}")
        return target.copy_(images)

    def _to_torch(self, tensor_list):
        """A DALI batch as a torch tensor on ``device`` (GPU outputs stay on the GPU).

        With DALI's dynamic executor (the default of the pinned DALI 2.4; create_pipeline keeps it)
        every batch is a buffer of its own, handed over without a copy through DLPack (DALI's own
        iterator does the same): the copy into a fresh torch tensor cost ~30% of the CPU-only
        loader's time. Images and labels of a GPU pipeline are both DALI GPU outputs; a host output
        bound for the GPU would be copied synchronously, so that DALI's buffer cannot be freed under
        an async copy.
        """
        import torch
        from nvidia.dali.backend import TensorListGPU

        dev = torch.device(self.device)
        on_gpu = isinstance(tensor_list, TensorListGPU)
        with dev if on_gpu else torch.device("cpu"):
            out = torch.from_dlpack(tensor_list.as_tensor())
        return out if on_gpu or dev.type == "cpu" else out.to(dev)

    def reset(self) -> None:
        """Finish the current epoch without reading its remaining batches."""
        self._next_epoch()
        self._drop()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The job's position: plain types, identical on every replica (safe for ``torch.load(weights_only=True)``)."""
        return {
            "version": STATE_VERSION,
            "epoch": int(self.epoch),
            "consumed": int(self.consumed),
            "seed": int(self.seed),
            "split": self.split,
            "batch_size": int(self.global_batch),
            "shuffle": self.data.shuffle,
            "replicas": int(self.world),  # the buffer mode replays an epoch only with the same count
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue at ``state``'s position, whatever replica or pipeline count saved it."""
        if state.get("version") != STATE_VERSION:
            raise AlexnetError(
                f"the checkpoint's loader state is version {state.get('version')}, this alexnet reads version "
                f"{STATE_VERSION}: restart the run from scratch"
            )
        mine = {"split": self.split, "batch_size": self.global_batch, "seed": self.seed, "shuffle": self.data.shuffle}
        theirs = {key: state.get(key) for key in mine}
        if theirs != mine:
            raise AlexnetError(f"loader state is for {theirs}, this loader reads {mine}")
        consumed = int(state["consumed"])
        if not 0 <= consumed <= self.num_records:
            raise AlexnetError(f"loader state has consumed {consumed} of {self.num_records} records")
        self.epoch, self.consumed, self.note = int(state["epoch"]), consumed, ""
        if self.buffer and int(state.get("replicas", self.world)) != self.world and consumed:
            # The caffe reader's parts depend on the replica count: the epoch restarts (README).
            self.note = f"buffer shuffle saved by {state['replicas']} replica(s): epoch {self.epoch + 1} restarts"
            self.consumed = 0
        elif self.buffer and consumed:
            self.note = (
                f"buffer shuffle: decoding the {consumed // self.global_batch} batches epoch {self.epoch + 1} "
                "had consumed again to reach its position (the global shuffle resumes at once)"
            )
        self._drop()


create_loader = DaliLoader  # the public name: trainer, tools and benchmarks call it
