#!/usr/bin/env bash
#SBATCH --job-name=ouro-train
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
#SBATCH --signal=B:TERM@300
# Slurm job across nodes: srun starts one torchrun per node, torchrun one process per GPU.
#   sbatch launch/deepspeed_multinode.sh thinking_sft model.path=/models/Ouro-1.4B output_dir=/checkpoints/run1
# Re-submitting the same command resumes from the newest complete checkpoint in output_dir. Slurm sends
# SIGTERM 5 minutes before the time limit (--signal): ouro-train saves a checkpoint and exits cleanly.
# Without Slurm, use the deepspeed launcher with a hostfile instead (it reaches the nodes with ssh and
# pdsh; or run it on every node yourself with --no_ssh: README, "Run on a cluster"):
#   .venv/bin/deepspeed --hostfile launch/hostfile --module ouro_train.train --config-name RECIPE [overrides...]
# The tools are taken from the project's virtualenv (.venv; OURO_VENV=DIR names another), on every node.
set -euo pipefail
recipe=${1:?usage: sbatch launch/deepspeed_multinode.sh RECIPE [hydra overrides...]}
shift
if [ -z "${SLURM_JOB_NODELIST:-}" ]; then
  echo "launch/deepspeed_multinode.sh is a Slurm batch script: submit it with" \
       "'sbatch --nodes N launch/deepspeed_multinode.sh $recipe ...'. Without Slurm, launch with a hostfile:" \
       "'.venv/bin/deepspeed --hostfile launch/hostfile --module ouro_train.train --config-name $recipe ...'" \
       "(ssh + pdsh, or --no_ssh on each node; README, \"Run on a cluster\")" >&2
  exit 2
fi
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
venv=${OURO_VENV:-${VIRTUAL_ENV:-$PWD/.venv}}
if [ ! -x "$venv/bin/ouro-prepare" ] || [ ! -x "$venv/bin/torchrun" ]; then
  echo "launch/deepspeed_multinode.sh: no ouro-prepare/torchrun in $venv/bin: install the project (README, Quick" \
       "start) where every node sees it, or set OURO_VENV" >&2
  exit 1
fi

master_addr=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
master_port=${MASTER_PORT:-29500}
gpus_per_node=${SLURM_GPUS_PER_NODE:-8}

# Tokenize and pack once on the first node (a shared data.cache_dir is reused by every rank).
srun --nodes=1 --ntasks=1 "$venv/bin/ouro-prepare" --config-name "$recipe" "$@"

srun --kill-on-bad-exit=1 "$venv/bin/torchrun" \
    --nnodes "$SLURM_JOB_NUM_NODES" --nproc_per_node "$gpus_per_node" \
    --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$master_addr:$master_port" \
    -m ouro_train.train --config-name "$recipe" "$@" &
pid=$!
# --signal=B:TERM reaches this batch shell only: pass it on (srun -> torchrun -> every rank).
trap 'kill -TERM "$pid"' TERM
wait "$pid" || wait "$pid"
