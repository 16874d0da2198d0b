"""Evaluation (§4.1): top-1 and top-5 error of the centre crop, or of the ten patches' mean softmax."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alexnet.pipeline import constants as C
from alexnet.pipeline.artifacts import read_manifest
from alexnet.pipeline.errors import AlexnetError

from . import distributed as D
from .precision import autocast, channels_last, set_tf32
from .rundir import RunDir, append_eval, record


def average_patch_softmax(logits: torch.Tensor, patches: int) -> torch.Tensor:
    """§4.1 test time: the mean of the softmax outputs over each image's ``patches`` patches.

    ``logits``: [B * patches, K], each image's patches consecutive. Returns [B, K] probabilities.
    """
    probs = torch.softmax(logits.float(), dim=1)
    return probs.view(-1, patches, probs.shape[1]).mean(dim=1)


def topk_counts(probs: torch.Tensor, labels: torch.Tensor, k: int = 5) -> torch.Tensor:
    """[# whose top-1 is the label, # with the label among the top-k] for a batch, on ``probs``' device
    (no host synchronisation: the caller sums them and reads once)."""
    k = min(k, probs.shape[1])
    top = probs.topk(k, dim=1).indices
    labels = labels.reshape(-1, 1).to(top.device)
    return torch.stack([(top[:, :1] == labels).sum(), (top == labels).any(dim=1).sum()])


@torch.no_grad()
def evaluate(
    net: torch.nn.Module,
    loader,
    *,
    ten_crop: bool = False,
    precision: str = "fp32",
    info: D.DistInfo | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Top-1 and top-5 error over every record of the loader's split (summed over replicas).

    Centre crop: batches [B, 3, 224, 224]. Ten patches (§4.1): batches [B, 10, 3, 224, 224]; the
    softmax outputs of an image's ten patches are averaged before ranking.
    """
    return evaluate_average([([net], loader)], ten_crop=ten_crop, precision=precision, info=info, progress=progress)


@torch.no_grad()
def evaluate_average(
    groups: list[tuple[list[torch.nn.Module], Any]],
    *,
    ten_crop: bool = False,
    precision: str | list[str] = "fp32",
    info: D.DistInfo | None = None,
    progress: bool = False,
    label_map: torch.Tensor | None = None,
) -> dict[str, Any]:
    """§6's averaged CNNs: the mean of several networks' softmax outputs, each network fed by its own
    group's loader (its own preprocessing: the loaders deliver the same records in the same order).

    ``groups``: [(networks, loader)]; ``precision`` (precision.py): one, or one per network in the groups' order.
    ``label_map``: the networks' output index of each dataset label (a test set of a subset of their classes),
    None when the dataset's labels are theirs. The counts stay on the device and are read once, at the end.
    """
    from tqdm import tqdm

    info = info or D.DistInfo()
    nets = [net for group, _ in groups for net in group]
    precisions = precision if isinstance(precision, list) else [precision] * len(nets)
    modes = [net.training for net in nets]
    for net in nets:
        net.eval()
    counts, seen = None, 0
    loaders = [loader for _, loader in groups]
    try:
        bar = tqdm(
            total=len(loaders[0]),
            desc="ten-patch eval" if ten_crop else "eval",
            unit="batch",
            leave=False,
            disable=not (progress and info.is_main),
            file=sys.stderr,
            dynamic_ncols=True,
        )
        for batches in zip(*loaders, strict=True):
            probs, i = None, 0
            labels = batches[0][1]  # the same records in every group's batch
            for (group, _), (images, _labels) in zip(groups, batches, strict=True):
                for net in group:
                    p = _probabilities(net, images, ten_crop, precisions[i])
                    probs, i = p if probs is None else probs + p, i + 1
            probs = probs / len(nets)
            if label_map is not None:  # moved to the labels' device once: no host round trip per batch
                label_map = label_map.to(labels.device)
                labels = label_map[labels.reshape(-1).long()]
            c = topk_counts(probs, labels)
            counts = c if counts is None else counts + c
            seen += probs.shape[0]
            bar.update(1)
        bar.close()
    finally:
        for net, mode in zip(nets, modes, strict=True):
            net.train(mode)
    correct1, correct5 = counts.tolist() if counts is not None else (0, 0)
    net = nets[0]
    device = net.output_device if getattr(net, "output_device", None) is not None else torch.device("cpu")
    correct1, correct5, seen = D.all_reduce_sum([correct1, correct5, seen], info, D.collective_device(device))
    if seen == 0:
        raise AlexnetError("the split gave no images")
    return {"top1_err": 1.0 - correct1 / seen, "top5_err": 1.0 - correct5 / seen, "images": int(seen)}


def _probabilities(net, images: torch.Tensor, ten_crop: bool, precision: str) -> torch.Tensor:
    """One network's softmax outputs [B, K] for a batch (the ten patches' mean with ``ten_crop``)."""
    if ten_crop:
        if images.dim() != 5 or images.shape[1] != C.TEN_CROP:
            raise AlexnetError(f"ten-patch evaluation needs [B, 10, 3, H, W] batches, got {list(images.shape)}")
        images = images.reshape(images.shape[0] * C.TEN_CROP, *images.shape[2:])
    if channels_last(images.device):
        images = images.contiguous(memory_format=torch.channels_last)
    set_tf32(precision, images.device)  # the checkpoint's arithmetic (fp32: no TF32), process-wide
    with autocast(precision, images.device):
        logits = net(images)
    return average_patch_softmax(logits, C.TEN_CROP) if ten_crop else torch.softmax(logits.float(), dim=1)


@dataclass
class Member:
    """One checkpoint of an evaluation: its network and the preprocessing it was trained with."""

    path: Path
    ck: dict[str, Any]
    model: torch.nn.Module
    data: Any  # DataConfig: the run's data settings with the checkpoint's mean
    precision: str  # the step's arithmetic it was trained with (precision.py)


def evaluate_checkpoints(
    config, checkpoints: list[Path], *, ten_crop: bool, given: dict | None = None, split: str = "val"
) -> dict:
    """``alexnet-train eval``: centre-crop (and, with ``ten_crop``, ten-patch) error on ``split`` (val or
    test) of one checkpoint, or of the average of several (§6). Each model runs as it was trained (the
    checkpoint decides: its mean, LRN form, precision); ``given`` (the typed options) may only confirm those
    settings. A test set of a subset of the models' classes (ImageNetV2) is scored with their full output
    (``results["classes"]`` says so); any other class mismatch is refused.

    One checkpoint's results are appended to its run's evals.jsonl (rundir.py), apart from training's own
    log: the run named by ``--run-dir``, else the one the checkpoint sits in (``RUN/checkpoints/``).
    """
    from .replica import create_loader_for, start_replica

    replica = start_replica(config.run.gpus)
    try:
        manifest = read_manifest(Path(config.run.data_dir))
        if split not in manifest.splits:
            raise AlexnetError(f"the dataset at {config.run.data_dir} has no {split} split")
        stats = _own_stats(Path(config.run.data_dir))
        members = [_member(config, Path(p), given or {}, replica, stats is None) for p in checkpoints]
        label_map, classes_note = _class_map(members, manifest, split, config.run.data_dir)
        for m in members if stats is not None else ():
            _check_mean(m.path, (m.ck.get("dataset") or {}).get("mean_image"), m.data.mean, Path(config.run.data_dir))
        replica.say(replica.note)
        groups: dict[Any, list[Member]] = {}
        for m in members:  # one loader per preprocessing and input dtype (and mean, when the checkpoints bring it)
            groups.setdefault((m.data, m.precision, str(m.path) if stats is None else ""), []).append(m)
        first = members[0]
        results: dict[str, Any] = {
            "checkpoint": str(first.path),
            "checkpoints": [str(m.path) for m in members],
            "step": first.ck["step"],
            "epoch": first.ck["epoch"],
            "split": split,
            "classes": classes_note,
        }
        log = _eval_log(config, first.path) if len(members) == 1 and replica.info.is_main else None
        per_replica = max(config.optim.batch_size // replica.info.world_size, 1)
        for ten in (False, True) if ten_crop else (False,):
            pairs = [
                (
                    [m.model for m in group],
                    create_loader_for(
                        config.replace(**vars(data), precision=precision),
                        split,
                        replica,
                        ten_crop=ten,
                        batch_size=per_replica,
                        stats=stats or _checkpoint_stats(group[0]),
                    ),
                )
                for (data, precision, _), group in groups.items()
            ]
            res = evaluate_average(
                pairs,
                ten_crop=ten,
                precision=[m.precision for g in groups.values() for m in g],
                info=replica.info,
                progress=config.run.progress,
                label_map=label_map,
            )
            del pairs  # the loaders and their reader processes, before the ten patches' ones start
            results["ten_crop" if ten else "centre_crop"] = res
            if log is not None:
                append_eval(
                    log,
                    record(
                        "checkpoint_eval",
                        checkpoint=str(first.path),
                        dataset=str(config.run.data_dir),
                        split=split,
                        ten_crop=ten,
                        step=first.ck["step"],
                        epoch=first.ck["epoch"],
                        **res,
                    ),
                )
        return results
    finally:
        D.destroy_process_group()


def _member(config, path: Path, given: dict, replica, needs_mean: bool = False) -> Member:
    """A checkpoint's network on this replica, with its own preprocessing (``needs_mean``: the dataset has no
    mean of its own, the checkpoint must hold one)."""
    from .checkpoint import checkpoint_precision, load_checkpoint, refuse_contradictions, saved_setting
    from .model import AlexNet

    ck = load_checkpoint(path)
    refuse_contradictions(path, ck, given)
    model = AlexNet.from_checkpoint(ck, devices=list(replica.devices))
    saved = {k: v for k in ("mean", "lighting_scale") if (v := saved_setting(ck, k)) is not None}
    data = dataclasses.replace(config.data, **saved)
    if needs_mean and (ck.get("dataset") or {}).get("mean_image") is None:
        raise AlexnetError(
            f"the dataset at {config.run.data_dir} has no mean of its own (no train split) and {path} "
            "saved none: evaluate a checkpoint that holds its mean"
        )
    if channels_last(replica.devices[0]):
        model = model.to(memory_format=torch.channels_last)
    return Member(path, ck, model, data, checkpoint_precision(ck))


def _class_map(members: list[Member], manifest, split: str, data_dir) -> tuple[torch.Tensor | None, str]:
    """``(label_map, note)``: None and "" when the dataset's classes are the models'; on a test split whose
    classes are a subset of theirs, each dataset label's output index and a note saying so; else refused in
    one line giving the number of classes that differ and the first five."""
    ours = list(manifest.classes)
    label_map, note = None, ""
    for m in members:
        theirs = list((m.ck.get("dataset") or {}).get("classes") or [])
        n = m.model.num_classes
        if theirs == ours or (not theirs and n == len(ours)):
            continue
        if theirs and split == "test" and set(ours) < set(theirs) and len(theirs) == n:
            index = {w: i for i, w in enumerate(theirs)}
            this_map = torch.tensor([index[w] for w in ours], dtype=torch.long)
            if label_map is not None and not torch.equal(label_map, this_map):
                raise AlexnetError("the averaged checkpoints were trained on different class sets")
            label_map = this_map
            note = f"{len(ours)} of the model's {n} classes, scored with its full {n}-way output"
            continue
        differ = sorted(set(theirs) ^ set(ours))
        detail = f"{len(differ)} classes differ (first: {', '.join(differ[:5])})" if theirs else "others"
        raise AlexnetError(
            f"{m.path} was trained on {n} classes, the dataset at {data_dir} has {len(ours)}: {detail}; "
            "evaluate on a dataset of its classes (--data-dir)"
        )
    return label_map, note


def _own_stats(data_dir: Path):
    """The dataset's ``(mean image, Stats)``; None when it has none (a test set without a train split)."""
    from alexnet.pipeline.artifacts import MEAN_IMAGE_FILE, STATS_FILE, read_mean_image, read_stats

    if not (data_dir / STATS_FILE).exists() and not (data_dir / MEAN_IMAGE_FILE).exists():
        if "train" not in read_manifest(data_dir).splits:
            return None
    return read_mean_image(data_dir), read_stats(data_dir)


def _checkpoint_stats(member: Member):
    """A checkpoint's mean as the loader's ``(mean image, Stats)``: evaluation subtracts it and draws no lighting."""
    from alexnet.pipeline.artifacts import Stats

    mean = np.asarray(member.ck["dataset"]["mean_image"], dtype=np.float32)
    rgb = mean.reshape(-1, 3).mean(axis=0).astype(float).tolist()
    eye = np.eye(3).tolist()
    return mean, Stats(mean_rgb=rgb, eigval=[0.0] * 3, eigvec=eye, n_images=0, n_pixels=0, source={"checkpoint": 1})


def _check_mean(path: Path, saved_mean, mean: str, data_dir: Path) -> None:
    """The mean the loader will subtract (the dataset's) must be the one the checkpoint was trained with."""
    from alexnet.pipeline.artifacts import read_mean_image, read_stats

    if saved_mean is None:
        return
    here = read_mean_image(data_dir)
    if mean == "channel":
        here = np.broadcast_to(np.asarray(read_stats(data_dir).mean_rgb, dtype=np.float32), here.shape)
    if not np.allclose(np.asarray(saved_mean, dtype=np.float32), here, atol=0.05):
        raise AlexnetError(
            f"the {mean} mean of the dataset at {data_dir} differs from the one {path} was trained "
            "with: evaluate on the dataset it was trained on (--data-dir)"
        )


def _eval_log(config, checkpoint: Path) -> RunDir | None:
    """The run whose evals.jsonl gets the result: ``--run-dir``, else the checkpoint's own run, else none."""
    return RunDir(config.run.run_dir) if config.run.run_dir else RunDir.of_checkpoint(checkpoint)
