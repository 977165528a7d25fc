#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (one or many hosts) with gcloud: create the slice, copy this checkout to
# every worker, install it, start the same training command on all workers (`--worker=all`), stream
# worker 0's log until training ends, delete the slice.
#
#   launch/tpu_pod.sh --name=NAME --zone=ZONE --accelerator=v5p-64 --config=CONFIG --workdir=DIR
#                     [--project=P] [--runtime=VERSION] [--spot] [--queued] [--reuse] [--keep]
#                     [--python=python3.11] [--cache=DIR] [--dry_run] [-- --config.key=value ...]
#
#   --spot      spot capacity (cheaper, preemptible: training saves on SIGTERM; rerun the same line).
#   --queued    ask through a queued resource (waits for capacity) instead of `tpu-vm create`.
#   --reuse     the slice exists already: skip creating it.   --keep   do not delete it at the end.
#   --workdir   a directory every worker sees at the same path (a Filestore / NFS mount, or a bucket
#               mounted with gcsfuse): each process writes its own checkpoint shards there.
#   --cache     XLA's persistent compilation cache on each worker (default ~/.cache/ouro_jax/xla), so a
#               rerun on the same slice skips compiling.
#   --dry_run   print every command instead of running it.
# Processes find each other through the TPU metadata (ouro_jax.distributed detects a Cloud TPU VM).
# Exit status: worker 0's training status (75: stopped by a signal after saving; rerun to resume).
set -euo pipefail
cd "$(dirname "$0")/.."

usage="usage: launch/tpu_pod.sh --name=NAME --zone=ZONE --accelerator=TYPE --config=CONFIG --workdir=DIR \
[--project=P] [--runtime=VERSION] [--spot] [--queued] [--reuse] [--keep] [--python=EXE] [--cache=DIR] \
[--dry_run] [-- TRAINING_FLAGS...]"
name="" zone="" accelerator="" config="" workdir="" project="" runtime="" python=python3.11
# shellcheck disable=SC2016  # expanded on the workers
cache='$HOME/.cache/ouro_jax/xla'
spot=0 queued=0 reuse=0 keep=0 dry_run=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --name=*) name=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --accelerator=*) accelerator=${1#*=} ;;
    --config=*) config=${1#*=} ;;
    --workdir=*) workdir=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --runtime=*) runtime=${1#*=} ;;
    --python=*) python=${1#*=} ;;
    --cache=*) cache=${1#*=} ;;
    --spot) spot=1 ;;
    --queued) queued=1 ;;
    --reuse) reuse=1 ;;
    --keep) keep=1 ;;
    --dry_run) dry_run=1 ;;
    --) shift; break ;;
    *) echo "error: unknown option $1; $usage" >&2; exit 1 ;;
  esac
  shift
done
for required in name zone accelerator config workdir; do
  [[ -n ${!required} ]] || { echo "error: --$required is needed; $usage" >&2; exit 1; }
done
if [[ -z $runtime ]]; then  # the TPU VM software version for each generation
  case $accelerator in
    v4-*) runtime="tpu-ubuntu2204-base" ;;
    v5litepod-*) runtime="v2-alpha-tpuv5-lite" ;;
    v5p-*) runtime="v2-alpha-tpuv5" ;;
    v6e-*) runtime="v2-alpha-tpuv6e" ;;
    *) echo "error: no default --runtime for --accelerator=$accelerator; pass --runtime=VERSION" >&2; exit 1 ;;
  esac
fi

show() { local line; printf -v line '%q ' "$@"; printf '%s\n' "${line% }"; }
run() {  # print a command, then run it unless --dry_run
  show "$@"
  if [[ $dry_run -eq 0 ]]; then "$@"; fi
}
where=("--zone=$zone")
[[ -z $project ]] || where+=("--project=$project")
tpu=(gcloud compute tpus tpu-vm)
on_workers() { run "${tpu[@]}" ssh "$name" "${where[@]}" "$@"; }

# 1. the slice
if [[ $reuse -eq 0 ]]; then
  capacity=()
  [[ $spot -eq 0 ]] || capacity=(--spot)
  if [[ $queued -eq 1 ]]; then
    run gcloud compute tpus queued-resources create "$name" "${where[@]}" --node-id="$name" \
      --accelerator-type="$accelerator" --runtime-version="$runtime" "${capacity[@]}"
    state_query=(gcloud compute tpus queued-resources describe "$name" "${where[@]}" --format='value(state.state)')
    show "${state_query[@]}"; echo "# (repeated every 30 s until it prints ACTIVE)"
    if [[ $dry_run -eq 0 ]]; then
      until [[ $("${state_query[@]}") == ACTIVE ]]; do sleep 30; done
    fi
  else
    run "${tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$accelerator" --version="$runtime" \
      "${capacity[@]}"
  fi
fi

# 2. this checkout on every worker, installed in a virtual environment
archive=${TMPDIR:-/tmp}/ouro_jax_$name.tar.gz
run tar --exclude=./.venv --exclude=./.git --exclude=./runs --exclude='*/__pycache__' -czf "$archive" .
run "${tpu[@]}" scp "$archive" "$name:ouro_jax.tar.gz" "${where[@]}" --worker=all
install="set -e; mkdir -p ouro_jax && tar -xzf ouro_jax.tar.gz -C ouro_jax && cd ouro_jax
command -v $python >/dev/null || (sudo apt-get update -q && sudo apt-get install -y -q $python $python-venv)
[ -d .venv ] || $python -m venv .venv
.venv/bin/pip install -q -e . 'jax[tpu]==0.10.2'"
on_workers --worker=all --command="$install"

# 3. the same training command on every worker, detached (it survives a dropped connection)
printf -v train '%q ' .venv/bin/python -m ouro_jax.train "--config=$config" "--workdir=$workdir" "$@"
train=${train% }
# shellcheck disable=SC2016  # $? and $HOME are expanded on the workers
job="JAX_COMPILATION_CACHE_DIR=$cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1 $train\
> ~/ouro_jax_train.log 2>&1; echo \$? > ~/ouro_jax_train.status"
printf -v job '%q' "$job"
on_workers --worker=all --command="cd ouro_jax && rm -f ~/ouro_jax_train.status && \
setsid nohup bash -c $job > /dev/null 2>&1 < /dev/null &"

# 4. worker 0's log until its training ends; its exit status is ours
# shellcheck disable=SC2016  # expanded on worker 0
follow='tail -n +1 -F ~/ouro_jax_train.log & tailer=$!
until [ -e ~/ouro_jax_train.status ]; do sleep 10; done
sleep 2; kill $tailer; exit "$(cat ~/ouro_jax_train.status)"'
status=0
on_workers --worker=0 --command="$follow" || status=$?

# 5. the slice goes (checkpoints stay in --workdir)
if [[ $keep -eq 0 ]]; then
  if [[ $queued -eq 1 ]]; then
    run gcloud compute tpus queued-resources delete "$name" "${where[@]}" --force --quiet
  else
    run "${tpu[@]}" delete "$name" "${where[@]}" --quiet
  fi
fi
exit "$status"
