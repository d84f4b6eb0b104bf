#!/usr/bin/env bash
# lora-tune on several machines under SLURM: one task per node, each running one process per GPU.
#
#   sbatch --nodes=2 --gpus-per-node=8 scripts/slurm_multi_node.sh recipes/my-recipe.yaml
#
# The first node of the allocation is the rendezvous point. Only rank 0 writes the run directory,
# so output_dir must be on a filesystem that node can write (shared or not).
#SBATCH --job-name=lora-tune
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --output=lora-tune-%j.out
set -euo pipefail

RECIPE=${1:?usage: sbatch scripts/slurm_multi_node.sh RECIPE [lora-tune train options]}
shift
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PORT=${MAIN_PORT:-29500}

# SLURM_NODEID differs per node, so it is expanded inside each task, not here.
srun --ntasks-per-node=1 bash -c 'exec lora-tune train "$@" --machine-rank "$SLURM_NODEID"' lora-tune \
    "$RECIPE" "$@" --num-processes $((SLURM_NNODES * GPUS_PER_NODE)) --num-machines "$SLURM_NNODES" \
    --main-process-ip "$MAIN_IP" --main-process-port "$MAIN_PORT"
