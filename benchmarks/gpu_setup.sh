#!/usr/bin/env bash
# Set-up used for the GPU figures in RESULTS.md on the lent GPU machine, which reaches no
# package registry: DALI and lmdb arrive as an unpacked site-packages tree (zstd tar, sent in
# parts), the machine's own CUDA torch is used, and the repository is made importable as
# `alexnet.*` through a symlink shim (the same mapping setup.cfg installs).
#   source benchmarks/gpu_setup.sh PARTS_DIR...
set -euo pipefail
G=/tmp/gpu
mkdir -p "$G/sp" "$G/pkg/alexnet"
if [ ! -f "$G/sp/.done" ]; then
  cat "$@" > "$G/sp.tar.zst"
  ZSTD=$(command -v zstd || echo "$PWD/.gpu/p0/bin/zstd")
  [ -x "$ZSTD" ] || ZSTD=/tmp/dl/bin/zstd
  "$ZSTD" -d --long=27 -c "$G/sp.tar.zst" | tar -xf - -C "$G/sp"
  touch "$G/sp/.done"
fi
for d in pipeline trainer tools; do ln -sfn "$PWD/$d" "$G/pkg/alexnet/$d"; done
export PYTHONPATH="$G/pkg:$G/sp${PYTHONPATH:+:$PYTHONPATH}"
export LD_LIBRARY_PATH="$G/sp/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
python3 -c "import torch, nvidia.dali, lmdb, PIL; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '', '| DALI', nvidia.dali.__version__, '| PIL', PIL.__version__)"
set +euo pipefail
