#!/usr/bin/env bash
# One node, all its GPUs, with the deepspeed launcher.
#   launch/single_node.sh thinking_sft model.path=/models/Ouro-1.4B output_dir=/checkpoints/run1
# NUM_GPUS defaults to every visible GPU.
set -euo pipefail
recipe=${1:?usage: launch/single_node.sh RECIPE [hydra overrides...]}
shift
num_gpus=${NUM_GPUS:-$(nvidia-smi --list-gpus | wc -l)}
cd "$(dirname "$0")/.."
# Tokenize and pack once, before the GPUs are held (the cache is reused by the run).
ouro-prepare --config-name "$recipe" "$@"
exec deepspeed --num_gpus "$num_gpus" --module ouro_train.train --config-name "$recipe" "$@"
