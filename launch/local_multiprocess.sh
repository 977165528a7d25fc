#!/usr/bin/env bash
# Train as N processes on this machine, each with its own CPU devices: what a multi-host run does (one
# process per host, a coordinator, per-process data and checkpoint shards), without the hosts.
#   launch/local_multiprocess.sh [--dry_run] [--num_processes=2] [--devices_per_process=4] [--port=PORT]
#                                CONFIG WORKDIR [--config.key=value ...]
# Process 0 prints to this terminal; process i > 0 writes WORKDIR.process_<i>.log. Ctrl-C or SIGTERM
# reaches every process: they save one checkpoint at the same step and stop (exit status 75); the same
# command resumes. Exit status: the first non-zero status of any process, else 0. --dry_run prints the
# commands instead of running them.
set -euo pipefail
cd "$(dirname "$0")/.."

usage="usage: launch/local_multiprocess.sh [--dry_run] [--num_processes=N] [--devices_per_process=D] \
[--port=PORT] CONFIG WORKDIR [--config.key=value ...]"
dry_run=0 num_processes=2 devices_per_process=4 port=12355
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --dry_run) dry_run=1 ;;
    --num_processes=*) num_processes=${1#*=} ;;
    --devices_per_process=*) devices_per_process=${1#*=} ;;
    --port=*) port=${1#*=} ;;
    *) echo "error: unknown option $1; $usage" >&2; exit 1 ;;
  esac
  shift
done
[[ $# -ge 2 ]] || { echo "error: CONFIG and WORKDIR are needed; $usage" >&2; exit 1; }
for value in "$num_processes" "$devices_per_process" "$port"; do
  [[ $value =~ ^[1-9][0-9]*$ ]] || {
    echo "error: --num_processes, --devices_per_process and --port take positive integers" >&2; exit 1; }
done
config=$1 workdir=$2
shift 2

cache=${JAX_CACHE:-$HOME/.cache/ouro_jax/xla}
environment=(JAX_PLATFORMS=cpu "JAX_NUM_CPU_DEVICES=$devices_per_process" "JAX_COMPILATION_CACHE_DIR=$cache"
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1)
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM  # every process saves and stops

for ((i = 0; i < num_processes; i++)); do
  cmd=(env "${environment[@]}" python -m ouro_jax.train "--config=$config" "--workdir=$workdir"
       "--coordinator_address=localhost:$port" "--num_processes=$num_processes" "--process_id=$i" "$@")
  log="$workdir.process_$i.log"
  if [[ $i -eq 0 ]]; then
    printf '%q ' "${cmd[@]}"; printf '&\n'
  else
    printf '%q ' "${cmd[@]}"; printf '> %q 2>&1 &\n' "$log"
  fi
  [[ $dry_run -eq 1 ]] && continue
  if [[ $i -eq 0 ]]; then "${cmd[@]}" & else "${cmd[@]}" > "$log" 2>&1 & fi
  pids+=($!)
done
[[ $dry_run -eq 0 ]] || exit 0

status=0
for pid in "${pids[@]}"; do
  while true; do  # a trapped signal interrupts `wait`: wait again until the process has ended
    code=0
    wait "$pid" || code=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  if [[ $code -ne 0 && $status -eq 0 ]]; then status=$code; fi
done
exit "$status"
