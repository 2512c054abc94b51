#!/usr/bin/env bash
# A conditional family (FAMILY: pix2pix | t2i) trained several ways on one project's upstream outputs, each evaluated
# under the params' protocol (or PROTOCOLS, e.g. "quick standard"): one factor at a time (benchmarks/RESULTS.md,
# "Pix2Pix" and "Text-to-image").
#
#   UPSTREAM=/path/to/a/project/after/make/repro WORK=/tmp/pix2pix_variants FAMILY=pix2pix benchmarks/conditional_variants.sh \
#       "default:" "l1-10:pix2pix.l1_weight=10" "width32:pix2pix.model.g_width=32"
#
# Each NAME:SETTINGS trains in $WORK/NAME with its own run directory, MLflow store and outputs; the upstream outputs
# (prepared data, classifier, reference statistics; for t2i the autoencoder and latents) are read from $UPSTREAM and left
# alone. The lines per variant: the training's wall-clock, then the evaluation's headline metrics (with the floor) per protocol.
set -uo pipefail
cd "$(dirname "$0")/.."
UPSTREAM=${UPSTREAM:?set UPSTREAM to a project directory after make repro}
FAMILY=${FAMILY:-pix2pix}
WORK=${WORK:-/tmp/${FAMILY}_variants}
PROTOCOLS=${PROTOCOLS:-quick}
PY=${PY:-.venv/bin/python}
export RAY_worker_niceness=${RAY_worker_niceness:-0}
for spec in "$@"; do
  name=${spec%%:*}; sets=${spec#*:}
  W=$WORK/$name; rm -rf "$W"; mkdir -p "$W"
  args=(--set "ray.storage_path=$W/runs" --set "outputs.$FAMILY.out_dir=$W/model" --set "outputs.$FAMILY.losses_file=$W/losses.csv"
        --set "tracking.tracking_uri=sqlite:///$W/mlflow.db" --set "evaluate.out_dir=$W/eval"
        --set "data.out_dir=$UPSTREAM/data/prepared" --set "classifier.out_dir=$UPSTREAM/models/classifier"
        --set "ref_stats.out_dir=$UPSTREAM/data/ref_stats" --set "latents.out_dir=$UPSTREAM/data/latents"
        --set "outputs.autoencoder.out_dir=$UPSTREAM/models/autoencoder")
  for s in $sets; do args+=(--set "$s"); done
  echo "== $name: ${sets:-(params.yaml)}"
  $PY -m pipelines.train_$FAMILY "${args[@]}" > "$W/train.log" 2>&1 || { echo "train failed: $W/train.log"; tail -5 "$W/train.log"; continue; }
  grep "finished" "$W/train.log" | tail -1
  for protocol in $PROTOCOLS; do
    $PY -m pipelines.evaluate --family $FAMILY --set "evaluate.protocol=$protocol" "${args[@]}" > "$W/eval-$protocol.log" 2>&1 \
      || { echo "evaluate failed: $W/eval-$protocol.log"; tail -3 "$W/eval-$protocol.log"; continue; }
    grep "\[evaluate\] fid" "$W/eval-$protocol.log" | sed "s/^.*\[evaluate\] /$protocol: /"
  done
done
