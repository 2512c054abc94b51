#!/usr/bin/env bash
# The GPU check: on a machine with one CUDA GPU, in at most ~8 minutes, a short training of each family
# (gan, autoencoder, ldm) under ddp, fsdp and deepspeed (ZeRO-2), the img/s of each, Inception img/s
# (torch fp32 and bf16 on the GPU), and the evaluate stage of both families; then one table.
#
#   benchmarks/gpu_check.sh            # on the GPU machine, from the repository root
#   benchmarks/gpu_check.sh --dry-run  # anywhere: syntax, the overlay validates, every command's --help parses
#
# It works in a copy of the tracked files under $WORK (default: a temp dir), with the tiny profile's data
# and models but GPU-sized step counts, so nothing in the checkout changes. Each row says ok or FAILED with
# the log file to read (and the log's tail). GPU_CHECK_STRATEGIES picks the strategies and their order (default
# "ddp fsdp deepspeed"); then the autoencoder and denoiser with torch.compile under ddp (GPU_CHECK_COMPILE=0 skips
# them). A step stops after GPU_CHECK_STEP_TIMEOUT s (default 180; its
# row says TIMED OUT, and its log ends with every thread's stack: where it waited). Where $OUT is set, the
# logs land there as one archive, refreshed after every step. PYTHON names the interpreter (default: python).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0; [ "${1:-}" = "--dry-run" ] && DRY=1
PY=$(command -v "${PYTHON:-python}"); [[ "$PY" = /* ]] || PY="$PWD/$PY"  # absolute: the check runs in a copy
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$WORK"
STEPS=${GPU_CHECK_STEPS:-300}

if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git ls-files -z | xargs -0 -I{} cp --parents {} "$WORK/"
else  # a copy of the tree without its .git (the device tool's): everything but the hidden folders
  tar cf - --exclude='./.*' . | tar xf - -C "$WORK"
fi
cd "$WORK"
cat > gpu.yaml <<EOF
# gpu_check overlay (over profiles/tiny.yaml): one GPU worker, GPU-sized batches, short runs
ray: {num_workers: 1, use_gpu: true, cpus_per_worker: 4}
# in-training evaluation 3 times a run, not the tiny profile's every 10 steps: under fsdp/deepspeed each one also writes a
# sharded checkpoint (~1 s on the H200), which made a 300-step run outlast the step timeout (RESULTS.md, session 49)
gan: {total_steps: $STEPS, global_batch_size: 256, checkpoint_every_steps: $STEPS, log_every_steps: 50, evaluation: {every_steps: $((STEPS / 3))}}
autoencoder: {total_steps: $STEPS, global_batch_size: 256, checkpoint_every_steps: $STEPS, log_every_steps: 50}
ldm: {total_steps: $STEPS, global_batch_size: 256, checkpoint_every_steps: $STEPS, log_every_steps: 50, evaluation: {every_steps: $((STEPS / 3))}}
tracking: {tracking_uri: "sqlite:///$WORK/mlflow.db"}
EOF
ARGS=(--overlay profiles/tiny.yaml --overlay gpu.yaml)
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled MLFLOW_DISABLE_TELEMETRY=true

if [ "$DRY" = 1 ]; then
  bash -n "$OLDPWD/benchmarks/gpu_check.sh" || exit 1
  $PY -c "from gen_core.config import load_config; c = load_config('params.yaml', overlays=['profiles/tiny.yaml', 'gpu.yaml']); \
assert c.ray.use_gpu and c.gan.total_steps == $STEPS; print('overlay ok')" || exit 1
  # each stage's `python -m pipelines.<stage> --help`, as runpy runs it, in one process: torch and diffusers imported once
  $PY - <<'PY' || exit 1
import contextlib, io, runpy, sys
for stage in ("prepare", "classifier", "ref_stats", "train_gan", "train_autoencoder", "encode_latents", "train_ldm", "evaluate"):
    sys.argv = [f"pipelines.{stage}", "--help"]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            runpy.run_module(f"pipelines.{stage}", run_name="__main__", alter_sys=True)
    except SystemExit as end:
        if end.code not in (0, None):
            sys.exit(f"pipelines.{stage} --help failed")
    else:
        sys.exit(f"pipelines.{stage} --help did not exit")
PY
  echo "dry run ok: would run in $WORK: prepare, classifier, ref_stats; train_{gan,autoencoder,ldm} x {ddp,fsdp,deepspeed};"
  echo "train_{autoencoder,ldm} compiled (ddp);"
  echo "Inception img/s (torch fp32/bf16 on cuda); evaluate --family gan|ldm"
  exit 0
fi

$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU: run with --dry-run')" || exit 1
ROWS=()
STEP_TIMEOUT=${GPU_CHECK_STEP_TIMEOUT:-180}
export PYTHONFAULTHANDLER=1  # a step stopped at its timeout (SIGABRT) prints every thread's stack: where it waited
step() {  # step NAME LOG CMD...: run (at most STEP_TIMEOUT s), time, record ok/FAILED/TIMED OUT
  local name=$1 log=$2; shift 2
  local t0=$SECONDS code=0
  timeout -s ABRT -k 10 "$STEP_TIMEOUT" "$@" >"$log" 2>&1 || code=$?
  if [ "$code" = 0 ]; then ROWS+=("$name|ok|$((SECONDS - t0))|$(rate "$log")")
  elif [ "$code" = 124 ] || [ "$code" = 134 ] || [ "$code" = 137 ]; then ROWS+=("$name|TIMED OUT after ${STEP_TIMEOUT} s ($log)|$((SECONDS - t0))|")
    "$PY" -m ray.scripts.scripts stop --force >/dev/null 2>&1  # the stopped driver's local Ray, before the next step starts its own
  else ROWS+=("$name|FAILED ($log)|$((SECONDS - t0))|"); fi
  echo "[gpu_check] $name: ${ROWS[-1]}"
  [[ "${ROWS[-1]}" != *"|ok|"* ]] && tail -n 25 "$log" | sed 's/^/    /'  # the cause (or the stacks), where only this output comes back
  [ -n "${OUT:-}" ] && tar czf "$OUT/gpu_check_logs.tgz" logs_*.txt  # after every step: a run stopped midway still returns its logs
}
rate() { { grep 'step [0-9]*/' "$1" || cat "$1"; } | grep -o '[0-9.]* img/s' | tail -1; }  # training's rate where the log has one

step prepare logs_prepare.txt $PY -m pipelines.prepare "${ARGS[@]}"
step classifier logs_classifier.txt $PY -m pipelines.classifier "${ARGS[@]}"
step ref_stats logs_ref_stats.txt $PY -m pipelines.ref_stats "${ARGS[@]}"
for strategy in ${GPU_CHECK_STRATEGIES:-ddp fsdp deepspeed}; do
  S=(--set ray.strategy=$strategy --set gan.run_name=gpu-$strategy --set autoencoder.run_name=gpu-$strategy --set ldm.run_name=gpu-$strategy)
  step "train_gan $strategy" logs_gan_$strategy.txt $PY -m pipelines.train_gan "${ARGS[@]}" "${S[@]}"
  step "train_autoencoder $strategy" logs_ae_$strategy.txt $PY -m pipelines.train_autoencoder "${ARGS[@]}" "${S[@]}"
  step "encode_latents ($strategy AE)" logs_latents_$strategy.txt $PY -m pipelines.encode_latents "${ARGS[@]}"
  step "train_ldm $strategy" logs_ldm_$strategy.txt $PY -m pipelines.train_ldm "${ARGS[@]}" "${S[@]}"
done
if [ "${GPU_CHECK_COMPILE:-1}" = 1 ]; then  # autoencoder.compile / ldm.compile under ddp: Triton kernels, never run on a GPU before
  C=(--set autoencoder.compile=true --set ldm.compile=true --set autoencoder.run_name=gpu-compiled --set ldm.run_name=gpu-compiled)
  step "train_autoencoder ddp compiled" logs_ae_compiled.txt $PY -m pipelines.train_autoencoder "${ARGS[@]}" "${C[@]}"
  step "encode_latents (compiled AE)" logs_latents_compiled.txt $PY -m pipelines.encode_latents "${ARGS[@]}"
  step "train_ldm ddp compiled" logs_ldm_compiled.txt $PY -m pipelines.train_ldm "${ARGS[@]}" "${C[@]}"
fi
step "inception cuda" logs_inception.txt $PY - <<'EOF'
import time, torch
from gen_core.config import InceptionConfig
from gen_core.metrics import load_inception
x = torch.rand(200, 3, 299, 299, device="cuda") * 255
for precision in ("fp32", "bf16"):
    net = load_inception(InceptionConfig(backend="torch"), "cuda", precision)
    for _ in range(3): net(x[:50])  # TorchScript's profiling executor optimises the graph over the first runs
    torch.cuda.synchronize(); t = time.perf_counter()
    for i in range(0, 200, 50): net(x[i:i + 50])
    torch.cuda.synchronize(); print(f"inception {net.precision}: {200 / (time.perf_counter() - t):.1f} img/s")
EOF
step "evaluate gan" logs_eval_gan.txt $PY -m pipelines.evaluate --family gan "${ARGS[@]}"
step "evaluate ldm" logs_eval_ldm.txt $PY -m pipelines.evaluate --family ldm "${ARGS[@]}"

echo; echo "gpu_check $(date -u +%F) $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $STEPS steps, work dir $WORK"
echo "| step | result | seconds | last img/s |"; echo "|---|---|---|---|"
for row in "${ROWS[@]}"; do echo "| ${row//|/ | } |"; done
grep -h "inception .*img/s" logs_inception.txt 2>/dev/null
! printf '%s\n' "${ROWS[@]}" | grep -qv '|ok|'
