#!/usr/bin/env bash
# Autoencoder variants, each followed by the latent denoiser trained on its latents: one factor at a time on one
# project's prepared data, classifier and reference statistics (benchmarks/RESULTS.md, "a perceptual autoencoder").
#
#   UPSTREAM=/path/to/a/project/after/make/repro WORK=/tmp/ae_variants benchmarks/ae_variants.sh \
#       "l1:" "lpips1:autoencoder.perceptual_weight=1.0"
#
# With SWEEP="[2,3,4]" the evaluation is the evaluate stage's guidance sweep at those scales instead of one
# evaluation at the LDM's own guidance.
#
# Each NAME:SETTINGS runs train_autoencoder (its export measures reconstruction PSNR and FID), encode_latents,
# train_ldm and evaluate (the params' protocol, the LDM's own guidance) in $WORK/NAME, with its own run directories,
# MLflow store and outputs; $UPSTREAM's prepared data, classifier and reference statistics are read and left alone.
set -uo pipefail
cd "$(dirname "$0")/.."
UPSTREAM=${UPSTREAM:?set UPSTREAM to a project directory after make repro}
WORK=${WORK:-/tmp/ae_variants}
SWEEP=${SWEEP:-}
PY=${PY:-.venv/bin/python}
export RAY_worker_niceness=${RAY_worker_niceness:-0}
for spec in "$@"; do
  name=${spec%%:*}; sets=${spec#*:}
  W=$WORK/$name; rm -rf "$W"; mkdir -p "$W"
  args=(--set "ray.storage_path=$W/runs" --set "tracking.tracking_uri=sqlite:///$W/mlflow.db"
        --set "data.out_dir=$UPSTREAM/data/prepared" --set "classifier.out_dir=$UPSTREAM/models/classifier"
        --set "ref_stats.out_dir=$UPSTREAM/data/ref_stats" --set "latents.out_dir=$W/latents"
        --set "outputs.autoencoder.out_dir=$W/autoencoder" --set "outputs.autoencoder.losses_file=$W/ae_losses.csv"
        --set "outputs.autoencoder.metrics_file=$W/autoencoder.json"
        --set "outputs.ldm.out_dir=$W/ldm" --set "outputs.ldm.losses_file=$W/ldm_losses.csv"
        --set "outputs.ldm.eval_file=$W/ldm_eval.csv" --set "evaluate.out_dir=$W/eval")
  for s in $sets; do args+=(--set "$s"); done
  echo "== $name: ${sets:-(params as they are)}"
  for stage in train_autoencoder encode_latents train_ldm; do
    $PY -m pipelines.$stage "${args[@]}" > "$W/$stage.log" 2>&1 || { echo "$stage failed: $W/$stage.log"; tail -3 "$W/$stage.log"; continue 2; }
    grep -h "finished .* steps in\|reconstruction psnr" "$W/$stage.log" | sed 's/^.*\[/  [/'
  done
  if [ -n "$SWEEP" ]; then
    $PY -m pipelines.evaluate --family ldm --guidance-sweep --set "evaluate.guidance.scales=$SWEEP" "${args[@]}" > "$W/evaluate.log" 2>&1 \
      || { echo "evaluate failed: $W/evaluate.log"; tail -3 "$W/evaluate.log"; continue; }
    grep -h "reconstruction psnr" "$W/train_autoencoder.log" | sed 's/^.*\[/  [/'
    grep -A12 "guidance sweep (" "$W/evaluate.log" | grep "^|"
    continue
  fi
  $PY -m pipelines.evaluate --family ldm "${args[@]}" > "$W/evaluate.log" 2>&1 || { echo "evaluate failed: $W/evaluate.log"; tail -3 "$W/evaluate.log"; continue; }
  $PY - "$W" <<'EOF'
import json, sys
from pathlib import Path
w = Path(sys.argv[1])
ae = json.loads((w / "autoencoder.json").read_text())
ev = json.loads(next((w / "eval").rglob("ldm.json")).read_text())
print(f"  autoencoder: psnr {ae['psnr_db']:.2f} dB, reconstruction fid {ae['fid']:.2f} ({ae['fid_images']} images)")
print(f"  ldm: fid {ev['fid']:.2f} (floor {ev['floor']['fid']:.2f}), recall {ev['recall']:.3f}, precision {ev['precision']:.3f}, "
      f"class accuracy {ev['class_accuracy']:.3f} ({ev.get('protocol_id', '')})")
EOF
done
