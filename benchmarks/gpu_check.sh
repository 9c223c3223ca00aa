#!/usr/bin/env bash
# The CUDA paths in one short run (fp16 + scaler and bf16 training steps, a one-process torchrun with NCCL,
# embedding throughput, warm inference). Run from the repository root, on the GPU machine:
#   bash benchmarks/gpu_check.sh          (about 5-8 minutes on one GPU; on a CPU it skips the CUDA parts)
# The GPU image has PyTorch, timm, transformers, pandas, scikit-learn, OpenCV; hydra-core, omegaconf,
# antlr4-python3-runtime and pydicom travel as wheels in .whl/ (see the device tool's README).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --find-links .whl hydra-core omegaconf pydicom 2>/dev/null || true
fi
$PY -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec timeout 480 $PY benchmarks/gpu_check.py "$@"
