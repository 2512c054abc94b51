#!/bin/bash
# glibc malloc settings against training-step img/s and minor page faults: each run a fresh process (the settings are
# process-wide and GLIBC_TUNABLES is read at start-up), the child of benchmarks/cpu_training.py (the default params'
# autoencoder and GAN steps on torch's default attention kernel, the denoiser's on the math kernel), two rounds.
#   none       glibc's defaults (adaptive mmap threshold, trim threshold 128 KiB)
#   trim       trim threshold 16 GiB alone (this turns the adaptive mmap threshold off: every block > 128 KiB is mmap()ed)
#   mmap_trim  mmap threshold 32 MiB + trim threshold 2 GiB - 1: what pipelines.worker.retain_freed_memory sets through
#              mallopt (whose int argument caps the trim threshold there)
#     benchmarks/glibc_malloc.sh [ROUNDS]
cd "$(dirname "$0")/.." || exit 1
declare -A ENVS=([none]="" [trim]="glibc.malloc.trim_threshold=17179869184"
                 [mmap_trim]="glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=2147483647")
echo "$(date +%F), $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p')"
for r in $(seq "${1:-2}"); do
  for m in "ae before" "ldm math attention" "gan before"; do
    set -- $m; model=$1; shift; variant="$*"
    for e in none trim mmap_trim; do
      out=$(GLIBC_TUNABLES=${ENVS[$e]} /usr/bin/time -f "faults %R" .venv/bin/python benchmarks/cpu_training.py --steps 8 \
            --child "$model" "$variant" 2>&1 | grep -v Warn | tail -2 | awk 'NR == 1 {print $1; next} {print}' | tr '\n' ' ')
      echo "round $r $model $e: img/s $out"
    done
  done
done
