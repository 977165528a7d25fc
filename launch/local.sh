#!/usr/bin/env bash
# Train on this machine: every local accelerator (or the CPU) in one process.
#   launch/local.sh configs/demo.py runs/demo [--config.key=value ...]
# Keeps a persistent XLA compilation cache under $JAX_CACHE (default ~/.cache/ouro_jax/xla), so a
# restarted or resumed run skips recompiling its train step.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?usage: launch/local.sh CONFIG WORKDIR [--config.key=value ...]}
workdir=${2:?usage: launch/local.sh CONFIG WORKDIR [--config.key=value ...]}
shift 2
export JAX_COMPILATION_CACHE_DIR=${JAX_CACHE:-$HOME/.cache/ouro_jax/xla}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-1}
exec python -m ouro_jax.train --config="$config" --workdir="$workdir" "$@"
