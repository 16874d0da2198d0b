#!/usr/bin/env bash
# The one prepared GPU check (issue 21): set-up from wheels, the GPU tests, the measurements of
# benchmarks/gpu_check.py, one results file. For a fresh GPU host that has PyTorch but neither DALI
# nor lmdb and no network.
#
#   benchmarks/gpu_check.sh pack      # HERE, with the package registry: the missing wheels (DALI 2.4.0
#                                     # for CUDA 13 and its libraries, lmdb, click, tqdm, tensorboardX,
#                                     # pytest, pillow; cp312) into .gpu/parts/part-* of 60 MiB each,
#                                     # 283 MB in 5 parts: NOT committed (.gitignore), carried instead
#   benchmarks/gpu_check.sh [OUT]     # ON THE GPU HOST, once the parts are there: OUT/gpu_check.json
#                                     # and OUT/gpu_tests.txt (default OUT: $OUT, else /tmp/gpu-check)
#
# With the device tool: one call per part (`carry: [".gpu/parts/part-aa"]`, command `true`; an
# ignored path stays on the warm machine between calls), then `bash benchmarks/gpu_check.sh`.
# Budget (6 min in all): set-up under 30 s, the GPU tests at most 90 s, the measurements at most 240 s;
# gpu_check.json is rewritten after every figure, the compiled steps (about a minute each) come last, so a
# time limit cuts those first and keeps the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
PARTS=.gpu/parts
if [ "${1:-}" = pack ]; then
  PY=${PYTHON:-.venv/bin/python}
  rm -rf .gpu/wheels "$PARTS" && mkdir -p .gpu/wheels "$PARTS"
  "$PY" -m pip download -q -d .gpu/wheels -c constraints.txt --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    nvidia-dali-cuda130 lmdb click tqdm tensorboardX pytest pillow
  tar -cf - -C .gpu wheels | split -b 60M - "$PARTS/part-"
  ls -l "$PARTS"
  exit 0
fi
OUT=${1:-${OUT:-/tmp/gpu-check}}
G=/tmp/alexnet-gpu-env
mkdir -p "$OUT" "$G/sp" "$G/pkg/alexnet"
if [ ! -f "$G/sp/.done" ]; then
  ls "$PARTS"/part-* >/dev/null || { echo "gpu_check: no $PARTS/part-* (run 'gpu_check.sh pack' and carry them)"; exit 2; }
  cat "$PARTS"/part-* | tar -xf - -C "$G"
  for w in "$G"/wheels/*.whl; do python3 -m zipfile -e "$w" "$G/sp"; done  # a wheel is a zip of site-packages
  rm -f "$G/sp/nvidia/__init__.py"  # keep `nvidia` a namespace shared with the host's CUDA wheels (torch's)
  touch "$G/sp/.done"
fi
for d in pipeline trainer tools; do ln -sfn "$PWD/$d" "$G/pkg/alexnet/$d"; done
export PYTHONPATH="$G/pkg:$G/sp${PYTHONPATH:+:$PYTHONPATH}"
export LD_LIBRARY_PATH="$G/sp/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"  # nvJPEG for DALI
python3 -c "import torch, nvidia.dali, lmdb; print('torch', torch.__version__, torch.cuda.get_device_name(0), '| DALI', nvidia.dali.__version__)" | tee "$OUT/versions.txt"
# The GPU tests (marked gpu; the CPU ones are run by make test).
timeout 90 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_step.py tests/test_model.py \
  tests/test_train.py tests/test_pipeline.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt" || true
timeout 240 python3 benchmarks/gpu_check.py --out "$OUT" 2>&1 | grep -v 'nvjpeg2k\|nvtiff\|Warning\|warn(' | tee "$OUT/gpu_check.txt"
