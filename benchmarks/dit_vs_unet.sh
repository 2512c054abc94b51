#!/usr/bin/env bash
# PROJECT=/path/to/project benchmarks/dit_vs_unet.sh   (a checkout after make repro: its latents, autoencoder and references)
# DiT vs U-Net at the default's training wall-clock (U-Net s 600 steps): dit-s 300 steps, dit-s-p2 780 steps
# (benchmarks/denoiser_step.py measured 0.48x and 1.21x the U-Net's training img/s), each then evaluated at the quick protocol at guidance 3 and 8 (the guidance sweep).
set -euo pipefail
cd "${PROJECT:?set PROJECT to a project after make repro}"
for spec in "dit-s:300:1" "dit-s-p2:780:2"; do
  IFS=: read name steps patch <<< "$spec"
  S=(--set ldm.denoiser.backbone=dit --set ldm.denoiser.dit.patch_size=$patch --set ldm.total_steps=$steps
     --set outputs.ldm.out_dir=models/ldm-$name --set outputs.ldm.losses_file=metrics/ldm-${name}_losses.csv
     --set outputs.ldm.eval_file=metrics/ldm-${name}_eval.csv)
  date; /usr/bin/time -f "$name train_ldm %e s" python -m pipelines.train_ldm "${S[@]}"
  date; python -m pipelines.evaluate --family ldm --guidance-sweep "${S[@]}" --set evaluate.out_dir=metrics/eval-$name --set "evaluate.guidance.scales=[3,8]"
done
date
