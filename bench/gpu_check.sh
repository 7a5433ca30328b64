#!/usr/bin/env bash
# The whole GPU check on any CUDA machine with a PyTorch image, in one command (≤ 8 minutes on an H100/H200):
#   bench/gpu_check.sh [WHEEL_DIR]        (default ../shared/wheels; build it with ../shared/tools/gpu-wheels.sh)
# Installs the wheels the image lacks (only when deepspeed is not importable), runs `pytest -m cuda`, then
# bench/train_throughput.py at 4K/8K/32K (full) and 8K (LoRA) with its in-run baseline. Writes
# $OUT/gpu_check.json (OUT defaults to outputs/gpu_check) and prints one table.
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=${1:-../shared/wheels}
out=${OUT:-outputs/gpu_check}
mkdir -p "$out"
export DS_ACCELERATOR=cuda WANDB_MODE=disabled HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import deepspeed, hydra" 2>/dev/null; then
  site=${SITE:-/tmp/ouro-site}
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl
  export PYTHONPATH="$site:$PYTHONPATH"
fi
# DeepSpeed's op builder cannot parse arch suffixes such as 9.0a (FusedAdam is JIT-built on first use).
if [[ ${TORCH_CUDA_ARCH_LIST:-} == *a* ]]; then export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST//a/}; fi
exec python3 bench/gpu_check.py --out "$out"
