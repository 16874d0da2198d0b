"""Evaluation (§4.1): top-1 and top-5 error of the centre crop, or of the ten patches' mean softmax."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

from alexnet.pipeline import constants as C
from alexnet.pipeline.artifacts import read_manifest
from alexnet.pipeline.errors import AlexnetError

from . import distributed as D
from .precision import autocast, channels_last


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
    from tqdm import tqdm

    info = info or D.DistInfo()
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
            if channels_last(images.device):
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(precision, images.device):
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
    correct1, correct5, seen = D.all_reduce_sum([correct1, correct5, seen], info, D.collective_device(device))
    if seen == 0:
        raise AlexnetError("the validation split gave no images")
    return {"top1_err": 1.0 - correct1 / seen, "top5_err": 1.0 - correct5 / seen, "images": int(seen)}


def evaluate_checkpoint(config, checkpoint: Path, *, ten_crop: bool) -> dict[str, Any]:
    """``alexnet-train eval``: centre-crop (and, with ``ten_crop``, ten-patch) error of a checkpoint on val.

    Logged to ``RUN/metrics.jsonl`` when a run directory is given (or the checkpoint sits in one).
    """
    from .checkpoint import CHECKPOINT_DIR, load_checkpoint
    from .model import AlexNet
    from .replica import create_loader_for, start_replica
    from .rundir import MetricsLog

    t0 = time.monotonic()
    replica = start_replica(config.run.gpus)
    try:
        replica.say(replica.note)
        manifest = read_manifest(Path(config.run.data_dir))
        if "val" not in manifest.splits:
            raise AlexnetError(f"the dataset at {config.run.data_dir} has no val split")
        ck = load_checkpoint(checkpoint)
        model = AlexNet.from_checkpoint(ck, devices=list(replica.devices))
        if model.num_classes != len(manifest.classes):
            raise AlexnetError(
                f"{checkpoint} was trained on {model.num_classes} classes, the dataset has {len(manifest.classes)}"
            )
        if channels_last(replica.devices[0]):
            model = model.to(memory_format=torch.channels_last)
        results: dict[str, Any] = {"checkpoint": str(checkpoint), "step": ck.get("step"), "epoch": ck.get("epoch")}
        run_dir = Path(config.run.run_dir) if config.run.run_dir else None
        if run_dir is None and Path(checkpoint).resolve().parent.name == CHECKPOINT_DIR:
            run_dir = Path(checkpoint).resolve().parent.parent
        metrics = MetricsLog(run_dir, replica.info.is_main, t0) if run_dir is not None else None
        per_replica = max(config.optim.batch_size // replica.info.world_size, 1)
        for ten in (False, True) if ten_crop else (False,):
            loader = create_loader_for(config, "val", replica, ten_crop=ten, batch_size=per_replica)
            res = evaluate(model, loader, ten_crop=ten, precision=config.model.precision,
                           info=replica.info, progress=config.run.progress)  # fmt: skip
            results["ten_crop" if ten else "centre_crop"] = res
            if metrics is not None:
                metrics.write({"kind": "eval", "split": "val", "ten_crop": ten, "step": ck.get("step"),
                               "epoch": ck.get("epoch"), **res})  # fmt: skip
        if metrics is not None:
            metrics.close()
        return results
    finally:
        D.destroy_process_group()
