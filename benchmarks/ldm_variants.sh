#!/usr/bin/env bash
# The denoiser trained several ways on one project's latents and autoencoder, each measured by the guidance sweep at
# guidance 3 and 8 (SCALES) under the params' protocol: one factor at a time (benchmarks/RESULTS.md, "the default LDM's guidance curve").
#
#   UPSTREAM=/path/to/a/project/after/make/repro WORK=/tmp/ldm_variants benchmarks/ldm_variants.sh \
#       "snr5:ldm.min_snr_gamma=5" "vpred-snr5:ldm.min_snr_gamma=5 ldm.noise.prediction_type=v_prediction"
#
# Each NAME:SETTINGS trains in $WORK/NAME with its own run directory, MLflow store and outputs; the upstream outputs
# (prepared data, latents, autoencoder, classifier, reference statistics) are read from $UPSTREAM and left alone.
set -uo pipefail
cd "$(dirname "$0")/.."
UPSTREAM=${UPSTREAM:?set UPSTREAM to a project directory after make repro}
WORK=${WORK:-/tmp/ldm_variants}
PY=${PY:-.venv/bin/python}
SCALES=${SCALES:-[3,8]}
export RAY_worker_niceness=${RAY_worker_niceness:-0}
for spec in "$@"; do
  name=${spec%%:*}; sets=${spec#*:}
  W=$WORK/$name; rm -rf "$W"; mkdir -p "$W"
  args=(--set "ray.storage_path=$W/runs" --set "outputs.ldm.out_dir=$W/ldm" --set "outputs.ldm.losses_file=$W/losses.csv"
        --set "outputs.ldm.eval_file=$W/eval.csv" --set "tracking.tracking_uri=sqlite:///$W/mlflow.db" --set "evaluate.out_dir=$W/eval"
        --set "data.out_dir=$UPSTREAM/data/prepared" --set "latents.out_dir=$UPSTREAM/data/latents"
        --set "outputs.autoencoder.out_dir=$UPSTREAM/models/autoencoder" --set "classifier.out_dir=$UPSTREAM/models/classifier"
        --set "ref_stats.out_dir=$UPSTREAM/data/ref_stats")
  for s in $sets; do args+=(--set "$s"); done
  echo "== $name: $sets"
  $PY -m pipelines.train_ldm "${args[@]}" > "$W/train.log" 2>&1 || { echo "train failed: $W/train.log"; tail -5 "$W/train.log"; continue; }
  grep "finished" "$W/train.log" | tail -1
  $PY -m pipelines.evaluate --family ldm --guidance-sweep --set "evaluate.guidance.scales=$SCALES" "${args[@]}" > "$W/eval.log" 2>&1 \
    || { echo "evaluate failed: $W/eval.log"; tail -3 "$W/eval.log"; continue; }
  grep -A6 "guidance sweep (" "$W/eval.log"
done
