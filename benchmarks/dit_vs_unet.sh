#!/usr/bin/env bash
# PROJECT=/path/to/project benchmarks/dit_vs_unet.sh   (a checkout after make repro: its latents, autoencoder and references)
# DiT vs U-Net at equal training wall-clock, each run then evaluated at the quick protocol at guidance 3 and 8 (the guidance sweep).
# SPECS: "name:steps:backbone:patch ..." runs under ldm.run_name RUN_NAME. The default: the default's training time (U-Net s
# 600 steps, 2m43s): DiT s 300 steps, DiT s on 2x2 patches 780 (benchmarks/denoiser_step.py: 0.48x and 1.21x the U-Net's img/s).
# About 8 minutes each (RESULTS.md "DiT vs U-Net"):
#   RUN_NAME=long SPECS="unet-s-long:2000:unet:1 dit-s-p2-long:2600:dit:2" PROJECT=... benchmarks/dit_vs_unet.sh
set -euo pipefail
cd "${PROJECT:?set PROJECT to a project after make repro}"
SPECS=${SPECS:-"dit-s:300:dit:1 dit-s-p2:780:dit:2"}
for spec in $SPECS; do
  IFS=: read name steps backbone patch <<< "$spec"
  S=(--set "ldm.run_name=${RUN_NAME:-genforge}" --set ldm.denoiser.backbone=$backbone --set ldm.denoiser.dit.patch_size=$patch
     --set ldm.total_steps=$steps --set outputs.ldm.out_dir=models/ldm-$name --set outputs.ldm.losses_file=metrics/ldm-${name}_losses.csv
     --set outputs.ldm.eval_file=metrics/ldm-${name}_eval.csv)
  date; /usr/bin/time -f "$name train_ldm %e s" python -m pipelines.train_ldm "${S[@]}"
  date; python -m pipelines.evaluate --family ldm --guidance-sweep "${S[@]}" --set evaluate.out_dir=metrics/eval-$name --set "evaluate.guidance.scales=[3,8]"
done
date
