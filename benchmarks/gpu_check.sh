#!/usr/bin/env bash
# The prepared GPU check in two stages (issue 26), for a GPU host that has Python and torch but no
# network, no DALI, lmdb or tensorboardX. Every stage writes its JSON after each figure and exits 0
# once it is written, under `timeout` too (--preserve-status: the scripts end themselves on SIGTERM).
#
#   benchmarks/gpu_check.sh pack          # HERE, with the package registry: the wheels stage 2 needs (DALI
#                                         # 2.4.0 for CUDA 13 and its libraries, lmdb, click, tqdm,
#                                         # tensorboardX, pytest, pillow; cp312) into .gpu/parts/part-* of
#                                         # 60 MiB each and .gpu/parts/MANIFEST (their sha256): NOT committed
#   benchmarks/gpu_check.sh probe [OUT]   # stage 1 (benchmarks/gpu_probe.py): torch alone, nothing carried,
#                                         # within 4 min: OUT/gpu_probe.json
#   benchmarks/gpu_check.sh dali [OUT]    # stage 2 (benchmarks/gpu_check.py): parts checked by count and
#                                         # checksum, unpacked, the GPU tests (pipeline first, tracebacks
#                                         # kept: OUT/gpu_tests.txt), the DALI figures: OUT/gpu_check.json
#   benchmarks/gpu_check.sh [OUT]         # both stages (`make gpu-check`); OUT: $OUT, else /tmp/gpu-check
#
# With the device tool: stage 1 in the first call (its own figures come back even if stage 2 never
# runs); then one call per part (`carry: [".gpu/parts/part-aa", ".gpu/parts/MANIFEST"]`, command `true`;
# an ignored path stays on the warm machine between calls), then `bash benchmarks/gpu_check.sh dali`.
# Budget: stage 1 240 s; stage 2: set-up under 30 s, the GPU tests 90 s, the figures 200 s.
set -uo pipefail
cd "$(dirname "$0")/.."
PARTS=.gpu/parts
G=/tmp/alexnet-gpu-env
STAGE=all
case "${1:-}" in pack | probe | dali) STAGE=$1; shift ;; esac
OUT=${1:-${OUT:-/tmp/gpu-check}}

pack() {
  local py=${PYTHON:-.venv/bin/python}
  rm -rf .gpu/wheels "$PARTS" && mkdir -p .gpu/wheels "$PARTS" || return 1
  "$py" -m pip download -q -d .gpu/wheels -c constraints.txt --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    nvidia-dali-cuda130 lmdb click tqdm tensorboardX pytest pillow || return 1
  tar -cf - -C .gpu wheels | split -b 60M - "$PARTS/part-" || return 1
  (cd "$PARTS" && sha256sum part-* >MANIFEST)
  ls -l "$PARTS"
}

# The project importable as alexnet.* from this checkout (the host has no venv of ours).
link_source() {
  mkdir -p "$G/pkg/alexnet"
  for d in pipeline trainer tools; do ln -sfn "$PWD/$d" "$G/pkg/alexnet/$d"; done
}

probe() {
  link_source
  PYTHONPATH="$G/pkg${PYTHONPATH:+:$PYTHONPATH}" timeout --preserve-status -k 10 240 \
    python3 benchmarks/gpu_probe.py --out "$OUT" --budget-s 220 2>&1 | tee "$OUT/gpu_probe.txt"
}

dali() {
  link_source
  python3 benchmarks/gpu_check.py setup --parts "$PARTS" --env "$G" || return 2
  export PYTHONPATH="$G/pkg:$G/sp${PYTHONPATH:+:$PYTHONPATH}"
  export LD_LIBRARY_PATH="$G/sp/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" # nvJPEG for DALI
  python3 -c "import torch, nvidia.dali, lmdb; print('torch', torch.__version__, torch.cuda.get_device_name(0), '| DALI', nvidia.dali.__version__)" |
    tee "$OUT/versions.txt"
  # The GPU tests (marked gpu; make test runs the rest), the pipeline's first; the whole output kept.
  timeout --preserve-status -k 5 90 python3 -m pytest -q -m gpu -p no:cacheprovider --tb=long \
    tests/test_pipeline.py tests/test_lrn.py tests/test_step.py tests/test_model.py tests/test_train.py \
    >"$OUT/gpu_tests.txt" 2>&1
  echo "GPU tests: exit $? ($(tail -1 "$OUT/gpu_tests.txt"))"
  timeout --preserve-status -k 10 200 python3 benchmarks/gpu_check.py measure --out "$OUT" --budget-s 180 2>&1 |
    grep -v 'nvjpeg2k\|nvtiff\|Warning\|warn(' | tee "$OUT/gpu_check.txt"
}

case $STAGE in
  pack) pack; exit $? ;;
  probe) mkdir -p "$OUT" && probe ;;
  dali) mkdir -p "$OUT" && dali ;;
  all)
    mkdir -p "$OUT" && probe
    if ls "$PARTS"/part-* >/dev/null 2>&1; then dali; else echo "gpu_check: no $PARTS/part-*: stage 2 skipped (run 'gpu_check.sh pack' here and carry them)"; fi
    ;;
esac
ls "$OUT"/gpu_probe.json "$OUT"/gpu_check.json 2>/dev/null && exit 0
exit 1 # no figure written
