"""The PyTorch-facing iterator over the DALI pipelines: exact epochs, resumable mid-epoch.

    cfg = LoaderConfig(batch_size=128, device="cuda:0")
    loader = create_loader(data_dir, "train", cfg)
    for images, labels in loader:        # one epoch: len(loader) batches
        ...
    state = loader.state_dict()          # position in the epoch + DALI's checkpoint (reader, RNGs)
    loader.load_state_dict(state)        # the next batch is the one an uninterrupted run would get

Epochs. The reader pads the last batch of each epoch (``pad_last_batch``), so epochs never mix.
Train yields the full batches and drops the padded one (its records come round again after the
next reshuffle); val yields every record exactly once, the last batch trimmed to its real size.

Pipelines. With ``pipelines=K`` the rank's records are split into K contiguous parts, each read by
a pipeline of its own (DALI sub-shard ``rank * K + j`` of ``world * K``: together exactly the
rank's records), and the batches are taken from the K pipelines in turn. On a GPU one pipeline
decodes one batch at a time; K of them keep the hardware decoder busy (``benchmarks/
results_pipeline.md``: 1.2-1.4x the rate with K=2, 1.3-1.9x with K=3 on an H100). Each part drops
its own partial train batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from . import artifacts as A
from . import constants as C
from .dali_pipeline import (
    READER_NAME,
    PipelineSpec,
    create_pipeline,
    graph_signature,
    record_positions,
    shard_size,
    spec_paths,
)
from .errors import AlexnetError, ContractError


class LoaderStateMismatch(AlexnetError):
    """A saved loader state whose DALI checkpoints cannot restore into this loader's pipelines
    (another decoder, region decoding, device or dtype); the caller may restart the epoch instead."""


def _opt(default, help, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class DataConfig:
    """The pipeline's settings, each default written once (the run config's ``data`` section)."""

    num_threads: int = _opt(4, "DALI CPU threads per replica.", min=1, aliases=("--threads", "--workers"))
    prefetch: int = _opt(3, "Batches each pipeline prepares ahead (3 keeps an H100 fed).", min=1)
    hw_decoder_load: float = _opt(0.9, "GPU: share of JPEGs for the hardware decoder (DALI's default 0.65; 0.9 measured best).", min=0)
    pipelines: int = _opt(0, "DALI pipelines per replica, taken in turn (0: 2 on a GPU, 1 on the CPU).", min=0)
    decoder: str = _opt("auto", "JPEG decoding: auto = nvJPEG ('mixed') on a GPU; 'cpu' decodes on the host.", choices=("auto", "mixed", "cpu"))
    roi_decode: bool = _opt(False, "Decode only the 224 crop window when training (same pixels).")
    mean: str = _opt("image", "Subtract the mean image (§2) or the per-channel mean.", choices=("image", "channel"))
    lighting_scale: str = _opt(C.DEFAULT_LIGHTING_SCALE, "§4.1 PCA lighting convention (docs/DEVIATIONS.md A2).", choices=C.LIGHTING_SCALES)

    def __post_init__(self) -> None:
        if not 0.0 <= self.hw_decoder_load <= 1.0:
            raise AlexnetError(f"hw_decoder_load must be in [0, 1], not {self.hw_decoder_load}")


@dataclass(frozen=True)
class LoaderConfig:
    batch_size: int  # images per batch on this rank (the run config gives §5's 128 over the replicas)
    num_threads: int = 2  # DALI CPU threads
    seed: int = 0
    shard_id: int = 0  # data-parallel rank
    num_shards: int = 1  # data-parallel world size
    device: str = "cpu"  # where batches are delivered; "cuda:N" runs DALI on GPU N
    dtype: str = "float32"  # "float32" | "float16" | "bfloat16" (DALI has no bfloat16: cast from float32 on delivery)
    mean: str = "image"  # "image" (per-pixel mean image) | "channel"
    lighting_scale: str = C.DEFAULT_LIGHTING_SCALE  # "sqrt" | "eigval01"
    ten_crop: bool = False  # val only: [B, 10, 3, 224, 224]
    prefetch: int = 2  # DALI prefetch queue depth
    shuffle: bool = True  # train only; False reads records in key order
    with_draws: bool = False  # also yield a dict: record positions (+ train: the random draws)
    roi_decode: bool = False  # train: decode only the crop window (see PipelineSpec)
    hw_decoder_load: float = 0.9  # GPU: share of JPEGs for the hardware decoder (0.9 measured best on an H100)
    decoder: str = "auto"  # "auto" (GPU: "mixed", nvJPEG; CPU: "cpu"), "mixed", or "cpu" (host decoding)
    pipelines: int = 1  # DALI pipelines for this rank, each over 1/pipelines of its records, taken in turn

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.num_threads < 1 or self.prefetch < 1 or self.pipelines < 1:
            raise AlexnetError("batch_size, num_threads, prefetch and pipelines must be >= 1")
        if not 0 <= self.shard_id < self.num_shards:
            raise AlexnetError(f"shard_id {self.shard_id} is not in [0, {self.num_shards})")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise AlexnetError(f"dtype must be float32, float16 or bfloat16, not {self.dtype!r}")
        if not 0.0 <= self.hw_decoder_load <= 1.0:
            raise AlexnetError(f"hw_decoder_load must be in [0, 1], not {self.hw_decoder_load}")
        if self.decoder not in ("auto", "mixed", "cpu"):
            raise AlexnetError(f"decoder must be 'auto', 'mixed' or 'cpu', not {self.decoder!r}")
        if self.mean not in ("image", "channel"):
            raise AlexnetError(f"mean must be 'image' or 'channel', not {self.mean!r}")
        if self.lighting_scale not in C.LIGHTING_SCALES:
            raise AlexnetError(f"lighting_scale must be one of {C.LIGHTING_SCALES}")


def device_id_for(device: str) -> int | None:
    """DALI's device_id for a torch device string; None (CPU-only mode) for the CPU."""
    if device == "cpu":
        return None
    if device.startswith("cuda"):
        _, _, index = device.partition(":")
        return int(index or 0)
    raise AlexnetError(f"unknown device {device!r} (use 'cpu' or 'cuda:N')")


class DaliLoader:
    """Iterates one split for one rank; see the module docstring."""

    def __init__(self, data_dir: Path, split: str, cfg: LoaderConfig):
        self.data_dir = Path(data_dir)
        self.split = split
        self.cfg = cfg
        manifest = A.read_manifest(self.data_dir)
        self.num_classes = len(manifest.classes)
        self.is_training = split == "train"
        if cfg.ten_crop and self.is_training:
            raise AlexnetError("ten_crop is for the validation split")
        self.mean_image = A.read_mean_image(self.data_dir)
        self.stats = A.read_stats(self.data_dir)
        total = manifest.splits[split].num_records if split in manifest.splits else 0
        k = cfg.pipelines
        shard_paths = spec_paths(self.data_dir, manifest, split)
        # Pipeline j reads DALI shard rank * k + j of world * k: contiguous blocks whose union is
        # exactly this rank's block of the world-size sharding.
        self.specs = [
            PipelineSpec(
                shard_paths=shard_paths, is_training=self.is_training,
                batch_size=cfg.batch_size, num_threads=cfg.num_threads, device_id=device_id_for(cfg.device),
                seed=cfg.seed, shard_id=cfg.shard_id * k + j, num_shards=cfg.num_shards * k,
                dtype="float32" if cfg.dtype == "bfloat16" else cfg.dtype, mean=cfg.mean,
                lighting_scale=cfg.lighting_scale, ten_crop=cfg.ten_crop, shuffle=cfg.shuffle, prefetch=cfg.prefetch,
                roi_decode=cfg.roi_decode, hw_decoder_load=cfg.hw_decoder_load, decoder=cfg.decoder,
            )
            for j in range(k)
        ]  # fmt: skip
        self.graph = graph_signature(self.specs[0])  # also checks the decoder against the device
        self.num_records_split = total
        self.part_records = [shard_size(total, spec.shard_id, spec.num_shards) for spec in self.specs]
        self.num_records = sum(self.part_records)
        if min(self.part_records) < 1:
            raise AlexnetError(
                f"the {split} split has too few records for rank {cfg.shard_id} of {cfg.num_shards}"
                + (f" with {k} pipelines each" if k > 1 else "")
            )
        # Reader batches per epoch and pipeline. With pad_last_batch every reader pads its part up to
        # the LARGEST part (sizes differ by <= 1) and then to whole batches, so a smaller part can end
        # with a batch of padding only: all readers (ranks, pipelines) run the same number of batches.
        largest = -(-total // (cfg.num_shards * k))
        self._reader_batches = -(-largest // cfg.batch_size)
        self.epoch = 0  # epochs completed
        self.batch_in_epoch = 0  # batches taken from the pipelines in the current epoch (all of them)
        self._pipes: list = [None] * k
        self._checkpoints: list[bytes | None] = [None] * k

    # ------------------------------------------------------------------ size
    def __len__(self) -> int:
        """Batches per epoch: train drops the last partial batch, val keeps it (every record once).

        Ranks may differ by up to ``pipelines`` batches (their parts differ by <= 1 record per
        pipeline); the trainer takes the smallest train length over the replicas.
        """
        return sum(self._yielded(n) for n in self.part_records)

    def _yielded(self, part: int) -> int:
        """Batches one pipeline yields per epoch from ``part`` records (train: full ones only)."""
        b = self.cfg.batch_size
        return part // b if self.is_training else -(-part // b)

    # ------------------------------------------------------------------ pipeline
    def _pipeline(self, j: int):
        if self._pipes[j] is None:
            pipe = create_pipeline(self.specs[j], self.mean_image, self.stats, checkpoint=self._checkpoints[j])
            pipe.build()
            meta = pipe.reader_meta(READER_NAME)
            if meta["epoch_size"] != self.num_records_split:
                raise ContractError(
                    f"the {self.split} shards hold {meta['epoch_size']} records, the manifest says "
                    f"{self.num_records_split}; run `alexnet-prep verify`"
                )
            self._pipes[j] = pipe
        return self._pipes[j]

    # ------------------------------------------------------------------ torch conversion
    def _to_torch(self, tensor_list, pipe):
        """A DALI batch as a torch tensor on ``cfg.device`` (GPU outputs stay on the GPU).

        With DALI's dynamic executor (the default) every batch is a buffer of its own, handed over
        without a copy through DLPack (DALI's own iterator does the same): the copy into a fresh
        torch tensor cost ~30% of the CPU-only loader's time. Images and labels of a GPU pipeline are
        both DALI GPU outputs; a host output bound for the GPU would be copied synchronously, so that
        DALI's buffer cannot be freed under an async copy.
        """
        import torch
        from nvidia.dali.backend import TensorListGPU
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        t = tensor_list.as_tensor()
        dev = torch.device(self.cfg.device)
        on_gpu = isinstance(tensor_list, TensorListGPU)
        if pipe.exec_dynamic:
            with dev if on_gpu else torch.device("cpu"):
                out = torch.from_dlpack(t)
        else:  # the legacy executors reuse their output buffers: copy out
            out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=dev if on_gpu else "cpu")
            feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(dev) if on_gpu else None)
        return out if on_gpu or dev.type == "cpu" else out.to(dev)

    # ------------------------------------------------------------------ iteration
    def __iter__(self):
        """The remaining batches of the current epoch (all of them from a fresh or finished epoch)."""
        import torch

        k = len(self.specs)
        while self.batch_in_epoch < self._reader_batches * k:
            index, j = divmod(self.batch_in_epoch, k)  # the pipelines take turns
            pipe = self._pipeline(j)
            outputs = pipe.run()
            self.batch_in_epoch += 1
            part = self.part_records[j]
            if index >= self._yielded(part):  # padding only, or (train) a partial batch: dropped
                continue
            valid = min(self.cfg.batch_size, part - index * self.cfg.batch_size)
            images = self._to_torch(outputs[0], pipe)
            if self.cfg.dtype == "bfloat16":
                images = images.to(torch.bfloat16)
            labels = self._to_torch(outputs[1], pipe).reshape(-1).to(torch.int64)
            if valid < self.cfg.batch_size:  # val: the padded part of the last batch
                images, labels = images[:valid], labels[:valid]
            if self.cfg.with_draws:
                draws = {"index": record_positions(outputs[2])[:valid]}
                if self.is_training:
                    draws["crop_xy"] = np.array(outputs[3].as_tensor()).reshape(-1, 2)
                    draws["mirror"] = np.array(outputs[4].as_tensor()).reshape(-1)
                    draws["alpha"] = np.array(outputs[5].as_tensor()).reshape(-1, 3)
                yield images, labels, draws
            else:
                yield images, labels
        self.epoch += 1
        self.batch_in_epoch = 0

    def reset(self) -> None:
        """Finish the current epoch without yielding its remaining batches."""
        for _ in self:
            pass

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Plain types only (safe for ``torch.load(weights_only=True)``)."""
        checkpoints = [
            pipe.checkpoint() if pipe is not None else cp
            for pipe, cp in zip(self._pipes, self._checkpoints, strict=True)
        ]
        return {
            "epoch": int(self.epoch),
            "batch_in_epoch": int(self.batch_in_epoch),
            "dali_checkpoints": [cp.decode("latin-1") if isinstance(cp, bytes) else cp for cp in checkpoints],
            "split": self.split,
            "batch_size": int(self.cfg.batch_size),
            "shard": [int(self.cfg.shard_id), int(self.cfg.num_shards)],
            "pipelines": len(self.specs),
            "graph": self.graph,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("split") != self.split or int(state.get("batch_size", -1)) != self.cfg.batch_size:
            raise AlexnetError(
                f"loader state is for split {state.get('split')!r} at batch size {state.get('batch_size')}, "
                f"not {self.split!r} at {self.cfg.batch_size}"
            )
        if list(state.get("shard", [])) != [self.cfg.shard_id, self.cfg.num_shards]:
            raise AlexnetError("loader state was saved with another data-parallel layout")
        if state.get("graph", self.graph) != self.graph:  # states from before the signature: trusted
            raise LoaderStateMismatch(
                f"loader state was saved by pipelines of another form ({state['graph']}, this loader: {self.graph})"
            )
        # States written before there could be several pipelines hold one "dali_checkpoint".
        cps = state["dali_checkpoints"] if "dali_checkpoints" in state else [state.get("dali_checkpoint")]
        if len(cps) != len(self.specs):
            raise AlexnetError(
                f"loader state was saved with {len(cps)} pipeline(s) per rank, this loader has {len(self.specs)}"
            )
        self._checkpoints = [cp.encode("latin-1") if isinstance(cp, str) else cp for cp in cps]
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self._pipes = [None] * len(self.specs)  # rebuilt from the checkpoints on the next batch


def create_loader(data_dir: Path, split: str, cfg: LoaderConfig) -> DaliLoader:
    """The loader for one split and one rank (see LoaderConfig)."""
    if split not in A.SPLITS:
        raise AlexnetError(f"unknown split {split!r}; choose one of {A.SPLITS}")
    return DaliLoader(Path(data_dir), split, cfg)


def preview_config(cfg: LoaderConfig) -> LoaderConfig:
    """Key-order reading with the draws exposed, for ``alexnet-prep preview``."""
    return replace(cfg, shuffle=False, with_draws=True, prefetch=1)
