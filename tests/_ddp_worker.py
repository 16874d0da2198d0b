"""One torchrun replica for tests/test_distributed.py (not a test module itself).

    torchrun --nproc-per-node 2 tests/_ddp_worker.py CONFIG_JSON OUT_DIR [KILL_AT_STEP]

Trains with ``alexnet.trainer.train.train`` (watched: tests/_train_fixtures.py) and writes, per replica, ``labels-rank{r}.json`` (the
labels of every batch it trained on, with step and epoch) and ``weights-rank{r}.pt`` (its network's
state dict at the end). With KILL_AT_STEP, every replica raises at that step (a simulated crash).
With ``TERM_AT=STEP`` in the environment, replica 1 alone sends itself a real SIGTERM at that step
(a scheduler's preemption reaching one process); ``summary-rank{r}.json`` holds train()'s summary.
With ``KILL9_AT=STEP``, replica 1 of torchrun's first attempt (``TORCHELASTIC_RESTART_COUNT=0``) kills
itself with SIGKILL at that step, before the step's checkpoint (a replica lost under ``--max-restarts``).
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch

from alexnet.trainer.config import TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _train_fixtures import train_watched  # noqa: E402


class Killed(Exception):
    pass


def main() -> None:
    config = TrainConfig.from_dict(json.loads(Path(sys.argv[1]).read_text()))
    out = Path(sys.argv[2])
    kill_at = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    term_at = int(os.environ.get("TERM_AT", "0"))
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    kill9_at = int(os.environ.get("KILL9_AT", "0")) if first_attempt else 0
    rank = int(os.environ["RANK"])
    seen = []

    def on_step(step, epoch, labels):
        seen.append({"step": step, "epoch": epoch, "labels": labels.reshape(-1).tolist()})
        if step == term_at and rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        if step == kill9_at and rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == kill_at:
            (out / f"labels-rank{rank}.json").write_text(json.dumps(seen))
            raise Killed(f"simulated crash at step {step}")

    summary, model = train_watched(config, on_step=on_step)
    torch.save(model.state_dict(), out / f"weights-rank{rank}.pt")
    (out / f"labels-rank{rank}.json").write_text(json.dumps(seen))
    (out / f"summary-rank{rank}.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
