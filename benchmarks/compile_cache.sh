#!/usr/bin/env bash
# What inductor's on-disk cache is worth to the three compiled-strategy tests (ddp, fsdp, zero2), and what running
# them one after another (their xdist group) saves over side by side when the cache is empty, as on CI's fresh machine.
# Each variant alone on the machine: its wall seconds and the machine's busy CPU-s (benchmarks/suite_profile.py busy_seconds).
#   benchmarks/compile_cache.sh          (needs .venv and g++; about 15 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
T=tests/test_strategies.py::test_compiled_denoiser_two_workers_match_single_process
CASES=("$T[ddp]" "$T[fsdp]" "$T[zero2]")
busy() { .venv/bin/python -c 'from benchmarks.suite_profile import busy_seconds; print(busy_seconds())'; }
measure() {  # LABEL PYTEST_ARGS...: one pytest run of the three cases
  local label=$1 b0 t0; shift
  b0=$(busy); t0=$(date +%s.%N)
  .venv/bin/python -m pytest -q -p no:cacheprovider "$@" "${CASES[@]}" | tail -1
  awk -v l="$label" -v w="$(echo "$(date +%s.%N) - $t0" | bc)" -v c="$(echo "$(busy) - $b0" | bc)" \
    'BEGIN { printf "%-48s wall %6.1f s  busy %6.1f CPU-s\n", l, w, c }'
}
cache=$(mktemp -d /tmp/genforge-inductor.XXXX); export TORCHINDUCTOR_CACHE_DIR=$cache
measure "side by side (xdist, 3 processes), cold" -n 3
rm -rf "$cache"; mkdir "$cache"
measure "one after another, cold" -p no:xdist
rm -rf "$cache"; mkdir "$cache"
TORCHINDUCTOR_COMPILE_THREADS=1 measure "one after another, cold, 1 compile thread" -p no:xdist
measure "one after another, warm (the same cache again)" -p no:xdist
rm -rf "$cache"
