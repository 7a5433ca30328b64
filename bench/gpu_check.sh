#!/usr/bin/env bash
# The whole GPU check on any CUDA machine with a PyTorch image, in one command (7-minute deadline by default):
#   bench/gpu_check.sh [WHEEL_DIR] [gpu_check.py options]   (WHEEL_DIR default ../shared/wheels; build it
#                                                           with ../shared/tools/gpu-wheels.sh)
#   bench/gpu_check.sh --dry-run        the rows, their expected seconds and commands; runs nothing
#   bench/gpu_check.sh --cpu            every row at tiny shapes on the CPU (tests the check itself)
# Installs the wheels the image lacks (only when deepspeed is not importable), then runs
# bench/gpu_check.py: each row in its own process, appended to $OUT/gpu_check.jsonl as it finishes (OUT
# defaults to outputs/gpu_check), one table last. Exits non-zero when any row failed or timed out.
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=../shared/wheels
if [[ $# -gt 0 && $1 != -* ]]; then wheels=$1; shift; fi
export OUT=${OUT:-outputs/gpu_check}
export WANDB_MODE=disabled HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
case " $* " in
  *" --dry-run "*|*" --cpu "*) ;;
  *)
    export DS_ACCELERATOR=cuda
    if ! python3 -c "import deepspeed, hydra" 2>/dev/null; then
      site=${SITE:-/tmp/ouro-site}
      python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl
      export PYTHONPATH="$site:$PYTHONPATH"
    fi ;;
esac
exec "${PYTHON:-python3}" bench/gpu_check.py --out "$OUT" "$@"
