#!/usr/bin/env bash
# Train on a GKE cluster through xpk (`pip install xpk`; the cluster made with `xpk cluster create`):
# one workload whose pods each run one training process, on TPU slices (one or several: multi-slice over
# the data-centre network) or on GPU node pools.
#
#   TPU:  launch/xpk.sh --cluster=C --workload=W --tpu_type=v5p-128 [--num_slices=2] --config=CONFIG --workdir=DIR
#   GPU:  launch/xpk.sh --cluster=C --workload=W --device_type=h100-80gb-8 --num_nodes=4 --config=CONFIG --workdir=DIR
#         [--project=P] [--zone=Z] [--base_docker_image=python:3.11] [--max_restarts=10] [--priority=medium]
#         [--dry_run] [-- --config.key=value ...]
#
# xpk copies this checkout into the base image (at /app); each pod installs it and trains. Processes find
# each other through the TPU environment GKE sets (ouro_jax.distributed detects it; on several slices the
# mesh puts data parallelism across slices), or on GPUs through xpk's NNODES / NODE_RANK /
# JAX_COORDINATOR_ADDRESS / JAX_COORDINATOR_PORT, passed as --num_processes, --process_id and
# --coordinator_address. --workdir must be shared by all pods (a Filestore or gcsfuse mount, see
# `xpk storage`). A preempted or failed workload restarts up to --max_restarts times and resumes from the
# latest checkpoint. --dry_run prints the xpk command instead of running it.
set -euo pipefail
cd "$(dirname "$0")/.."

usage="usage: launch/xpk.sh --cluster=C --workload=W (--tpu_type=T [--num_slices=N] | --device_type=D \
--num_nodes=N) --config=CONFIG --workdir=DIR [--project=P] [--zone=Z] [--base_docker_image=IMAGE] \
[--max_restarts=N] [--priority=P] [--dry_run] [-- TRAINING_FLAGS...]"
cluster="" workload="" tpu_type="" num_slices=1 device_type="" num_nodes="" config="" workdir=""
project="" zone="" base_docker_image=python:3.11 max_restarts=10 priority=medium dry_run=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --cluster=*) cluster=${1#*=} ;;
    --workload=*) workload=${1#*=} ;;
    --tpu_type=*) tpu_type=${1#*=} ;;
    --num_slices=*) num_slices=${1#*=} ;;
    --device_type=*) device_type=${1#*=} ;;
    --num_nodes=*) num_nodes=${1#*=} ;;
    --config=*) config=${1#*=} ;;
    --workdir=*) workdir=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --base_docker_image=*) base_docker_image=${1#*=} ;;
    --max_restarts=*) max_restarts=${1#*=} ;;
    --priority=*) priority=${1#*=} ;;
    --dry_run) dry_run=1 ;;
    --) shift; break ;;
    *) echo "error: unknown option $1; $usage" >&2; exit 1 ;;
  esac
  shift
done
for required in cluster workload config workdir; do
  [[ -n ${!required} ]] || { echo "error: --$required is needed; $usage" >&2; exit 1; }
done
if [[ -n $tpu_type && -n $device_type ]] || [[ -z $tpu_type && -z $device_type ]]; then
  echo "error: give --tpu_type (TPU slices) or --device_type with --num_nodes (GPUs); $usage" >&2; exit 1
fi

printf -v train '%q ' python -m ouro_jax.train "--config=$config" "--workdir=$workdir" "$@"
train=${train% }
xpk=(xpk workload create "--cluster=$cluster" "--workload=$workload" "--base-docker-image=$base_docker_image"
     --script-dir=. "--max-restarts=$max_restarts" "--priority=$priority")
[[ -z $project ]] || xpk+=("--project=$project")
[[ -z $zone ]] || xpk+=("--zone=$zone")
cache="JAX_COMPILATION_CACHE_DIR=/tmp/xla_cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1"
if [[ -n $tpu_type ]]; then
  xpk+=("--tpu-type=$tpu_type" "--num-slices=$num_slices")
  command="pip install -q -e . 'jax[tpu]==0.10.2' && $cache $train"
else
  [[ $num_nodes =~ ^[1-9][0-9]*$ ]] || { echo "error: --num_nodes=N is needed with --device_type" >&2; exit 1; }
  xpk+=("--device-type=$device_type" "--num-nodes=$num_nodes")
  # shellcheck disable=SC2016  # xpk's variables, expanded in each pod
  distributed='--coordinator_address=$JAX_COORDINATOR_ADDRESS:$JAX_COORDINATOR_PORT --num_processes=$NNODES --process_id=$NODE_RANK'
  command="pip install -q -e . 'jax[cuda12]==0.10.2' && $cache $train $distributed"
fi
xpk+=("--command=$command")

printf -v line '%q ' "${xpk[@]}"
printf '%s\n' "${line% }"
[[ $dry_run -eq 1 ]] || exec "${xpk[@]}"
