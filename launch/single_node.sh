#!/usr/bin/env bash
# One node, all its GPUs, with the deepspeed launcher (no hostfile: no ssh or pdsh needed).
#   launch/single_node.sh thinking_sft model.path=/models/Ouro-1.4B output_dir=/checkpoints/run1
# NUM_GPUS defaults to every visible GPU. The tools are taken from the project's virtualenv (.venv, as
# README's install makes it; OURO_VENV=DIR names another, an activated one is used as it is): nothing
# needs to be on PATH.
set -euo pipefail
recipe=${1:?usage: launch/single_node.sh RECIPE [hydra overrides...]}
shift
cd "$(dirname "$0")/.."
venv=${OURO_VENV:-${VIRTUAL_ENV:-$PWD/.venv}}
if [ ! -x "$venv/bin/ouro-prepare" ] || [ ! -x "$venv/bin/deepspeed" ]; then
  echo "launch/single_node.sh: no ouro-prepare/deepspeed in $venv/bin: install the project as README's Quick start" \
       "says, or set OURO_VENV to the virtualenv that has it" >&2
  exit 1
fi
if [ -z "${NUM_GPUS:-}" ]; then
  command -v nvidia-smi >/dev/null || { echo "launch/single_node.sh: no nvidia-smi to count the GPUs: set NUM_GPUS" >&2; exit 1; }
  NUM_GPUS=$(nvidia-smi --list-gpus | wc -l)
fi
# Tokenize and pack once, before the GPUs are held (the cache is reused by the run).
"$venv/bin/ouro-prepare" --config-name "$recipe" "$@"
exec "$venv/bin/deepspeed" --num_gpus "$NUM_GPUS" --module ouro_train.train --config-name "$recipe" "$@"
