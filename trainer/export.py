"""``alexnet-train export``: a self-contained inference file that plain PyTorch loads and runs.

    ep = torch.export.load("alexnet.pt2", extra_files=(extra := {"alexnet.json": ""}))
    probs = ep.module()(batch)              # [N, 3, 224, 224] float32, mean-subtracted -> [N, classes]
    meta = json.loads(extra["alexnet.json"])  # classes, names, crop size, input contract
    mean = np.load(io.BytesIO(base64.b64decode(meta["mean_image_npy_b64"])))  # (256, 256, 3)

The program is ``torch.export`` of the network in eval mode followed by a softmax (§4.1's test-time
dropout x0.5 included), with a dynamic batch dimension. The file carries what preprocessing needs
in ``alexnet.json``: the class list and names, the stored and crop sizes, and the mean image as a
base64 ``.npy``. Loading needs torch (and numpy for the mean image), not this package.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from alexnet.pipeline import constants as C

from .predict import Predictor

META_FILE = "alexnet.json"


class Probabilities(nn.Module):
    """The network followed by the softmax: [N, 3, 224, 224] mean-subtracted -> [N, classes]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x), dim=1)


def metadata(pred: Predictor) -> dict:
    buf = io.BytesIO()
    np.save(buf, np.asarray(pred.mean_image, dtype=np.float32), allow_pickle=False)
    return {
        "format": "alexnet inference v1",
        "input": "float32 [N, 3, 224, 224], RGB on the 0-255 scale minus the mean image (centre 224 patch "
        "of mean_image for a centre crop); images first resized to shorter side 256 and centre-cropped to 256",
        "output": "float32 [N, classes] softmax probabilities, in the order of 'classes'",
        "stored_size": C.STORED_SIZE,
        "crop_size": C.CROP_SIZE,
        "classes": pred.classes,
        "class_names": pred.names or pred.classes,
        "mean_image_npy_b64": base64.b64encode(buf.getvalue()).decode("ascii"),
    }


def export(pred: Predictor, out: Path) -> Path:
    """Write the exported program with its metadata to ``out``; returns ``out``."""
    module = Probabilities(pred.model).eval()
    example = torch.zeros(2, 3, C.CROP_SIZE, C.CROP_SIZE)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        module(example)  # fills the response normalisation's band cache before tracing (constants then)
        program = torch.export.export(module, (example,), dynamic_shapes={"x": {0: batch}})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.stem}.pt2")  # written whole, then renamed
    torch.export.save(program, tmp, extra_files={META_FILE: json.dumps(metadata(pred))})
    tmp.replace(out)
    return out
