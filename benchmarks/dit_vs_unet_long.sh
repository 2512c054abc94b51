#!/usr/bin/env bash
# PROJECT=/path/to/project benchmarks/dit_vs_unet_long.sh   (a checkout after make repro; the longer budget of dit_vs_unet.sh)
# DiT (2x2 patches) vs U-Net at ~9 minutes of training each: U-Net s 2000 steps, DiT s p2 2600 steps (their 3.68 and 4.81
# steps/s in the 2m43s / 2m42s runs), fresh runs (run_name long), each then the guidance sweep at 3 and 8, quick protocol.
set -euo pipefail
cd "${PROJECT:?set PROJECT to a project after make repro}"
for spec in "unet-s-long:2000:unet:1" "dit-s-p2-long:2600:dit:2"; do
  IFS=: read name steps backbone patch <<< "$spec"
  S=(--set ldm.run_name=long --set ldm.denoiser.backbone=$backbone --set ldm.denoiser.dit.patch_size=$patch --set ldm.total_steps=$steps
     --set outputs.ldm.out_dir=models/ldm-$name --set outputs.ldm.losses_file=metrics/ldm-${name}_losses.csv
     --set outputs.ldm.eval_file=metrics/ldm-${name}_eval.csv)
  date; /usr/bin/time -f "$name train_ldm %e s" python -m pipelines.train_ldm "${S[@]}"
  date; python -m pipelines.evaluate --family ldm --guidance-sweep "${S[@]}" --set evaluate.out_dir=metrics/eval-$name --set "evaluate.guidance.scales=[3,8]"
done
date
