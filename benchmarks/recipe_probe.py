"""Why a run blows up or stalls: per-layer figures over the first steps of the paper's recipe.

Trains the network at the paper's defaults (batch 128, lr 0.01, momentum 0.9, weight decay 5e-4, the
§5 init) on a dataset built by the real tools, through the real DALI loader, and prints per step:

* the loss, and the spread between the classes' mean logits (how far the output layer's per-class
  offsets have moved: the same for every image while fc7's inputs are nearly constant);
* ``h7_sq``: the mean squared length of fc8's input (fc7's output after dropout); a step moves class
  c's logit of every image by about lr x h7_sq x (mean p_c - share of class c in the batch);
* the fraction of zero outputs after each ReLU (dead units), and each layer's weight-gradient norm.

``--dropout inverted`` swaps in torch's ``nn.Dropout`` (kept outputs x 2 while training), the form
this project used before; ``--dropout paper`` is the model's own (the paper's and the authors').

    .venv/bin/python benchmarks/recipe_probe.py --data-dir ~/.cache/alexnet/recipe-check/sample-100-20/data --dropout inverted
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import torch
import torch.nn.functional as F

from alexnet.pipeline.artifacts import read_manifest
from alexnet.pipeline.loader import DataConfig, create_loader
from alexnet.trainer import constants as TC
from alexnet.trainer.health import layer_norms
from alexnet.trainer.model import LEARNED_LAYERS, AlexNet
from alexnet.trainer.optim import create_optimizer

RELU_LAYERS = LEARNED_LAYERS[:-1]  # every layer but fc8 is followed by a ReLU


def build(num_classes: int, lrn: str, dropout: str) -> tuple[AlexNet, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = AlexNet(num_classes=num_classes, lrn=lrn).train()
    if dropout == "inverted":
        model.drop6, model.drop7 = torch.nn.Dropout(TC.DROPOUT_P), torch.nn.Dropout(TC.DROPOUT_P)
    seen: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(_module, _inputs, output):
            seen[name] = (output if torch.is_tensor(output) else torch.cat(output, 1)).detach()

        return hook

    for name in RELU_LAYERS:
        getattr(model, name).register_forward_hook(keep(name))
    model.drop7.register_forward_hook(keep("fc8_input"))
    return model, seen


def probe_step(model, optimizer, seen, images, labels) -> dict:
    logits = model(images)
    loss = F.cross_entropy(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norms = layer_norms(model, LEARNED_LAYERS)
    optimizer.step()
    h = seen["fc8_input"]
    return {
        "loss": round(loss.item(), 3),
        "h7_sq": round((h * h).sum(1).mean().item(), 1),
        "class_logit_spread": round(logits.detach().mean(0).std().item(), 3),
        "zero_after_relu": {n: round((seen[n] <= 0).float().mean().item(), 3) for n in RELU_LAYERS},
        "grad_norm": {n: round(v, 3) for n, v in norms["grad_norm"].items()},
    }


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--steps", type=click.IntRange(min=1), default=12, show_default=True)
@click.option("--lr", type=float, default=TC.BASE_LR, show_default=True)
@click.option("--lrn", type=click.Choice(TC.LRN_FORMS), default=TC.DEFAULT_LRN, show_default=True)
@click.option("--dropout", type=click.Choice(["paper", "inverted"]), default="paper", show_default=True)
def main(data_dir: Path, steps: int, lr: float, lrn: str, dropout: str) -> None:
    """Per-step loss, fc8-input size, class-logit spread, dead ReLUs and gradient norms."""
    num_classes = len(read_manifest(data_dir).classes)
    model, seen = build(num_classes, lrn, dropout)
    optimizer = create_optimizer(model, lr, TC.MOMENTUM, TC.WEIGHT_DECAY)
    loader = create_loader(data_dir, "train", DataConfig(num_threads=1), batch_size=TC.BATCH_SIZE)
    step = 0
    while step < steps:
        for images, labels in loader:
            rec = probe_step(model, optimizer, seen, images, labels.reshape(-1).long())
            step += 1
            click.echo(json.dumps({"step": step, "dropout": dropout, "lrn": lrn, **rec}))
            if step >= steps:
                break


if __name__ == "__main__":
    main()
