#!/usr/bin/env bash
# The trainer end to end on the lent GPU machine: a 100-step run across an epoch end (evaluation),
# and the same run killed at step 40 and resumed, compared weight by weight; the CUDA-graph step
# runs while DALI prefetches. Figures: results_train.md. Needs the parts of gpu_setup.sh in /tmp/dl.
#   bash benchmarks/gpu_train_check.sh
source benchmarks/gpu_setup.sh /tmp/dl/part0 /tmp/dl/part1 /tmp/dl/part2 >/dev/null 2>&1
F='nvjpeg2k\|nvtiff\|nvTIFF\|nvJPEG2000\|Warning\|warn(\|^\s*$'
D=/tmp/alexnet-bench-train/synthetic-10000
python3 -c "import sys; from pathlib import Path; sys.path.insert(0, 'benchmarks'); from bench_train import synth_dataset; synth_dataset(Path('$D'), 10000)" 2>&1 | tail -1
T="python3 -m alexnet.trainer.cli --data-dir $D --gpus 0 --bf16 --channels-last --threads 4 --no-progress --log-every-steps 10"
$T --run-dir /tmp/r1 --max-steps 100 2>&1 | grep -v "$F" | tail -4
$T --run-dir /tmp/r2 --max-steps 40 2>&1 | grep -v "$F" | tail -1
$T --run-dir /tmp/r2 --max-steps 100 --resume 2>&1 | grep -v "$F" | tail -3
python3 - <<'PY'
import json
from alexnet.trainer import checkpoint as c
a, b = c.load_checkpoint("/tmp/r1/checkpoints/last.pt"), c.load_checkpoint("/tmp/r2/checkpoints/last.pt")
d = max(float((a["model"][k].float() - b["model"][k].float()).abs().max()) for k in a["model"])
s = max(float(a["model"][k].float().abs().max()) for k in a["model"])
print(f"uninterrupted vs killed+resumed at step {a['step']}/{b['step']}: max |dw| {d:.3g} (max |w| {s:.3g})")
for r in ("r1", "r2"):
    m = [json.loads(l) for l in open(f"/tmp/{r}/metrics.jsonl")]
    print(r, [(x["step"], round(x["loss"], 4), x.get("images_per_s")) for x in m if x["kind"] == "train"][-3:],
          [(x["step"], x["top1_err"]) for x in m if x["kind"] == "eval"])
PY
