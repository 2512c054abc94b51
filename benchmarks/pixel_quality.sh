#!/usr/bin/env bash
# The pixel-space EDM baseline (profiles/pixel-quality.yaml) in PROJECT (a checkout after make repro that has the
# standard reference: python -m pipelines.ref_stats --overlay profiles/ldm-quality.yaml): train; sweep guidance at the
# quick protocol (evaluate.guidance.scales of the profile; metrics/eval/pixel-quality/quick/ldm_guidance.json); re-export
# at the scale the sweep chose (the lowest FID with class accuracy >= evaluate.guidance.class_accuracy_floor); evaluate
# at the quick and the standard protocol (metrics/eval/pixel-quality/<protocol>/ldm.json).
#   PROJECT=/path/to/project benchmarks/pixel_quality.sh
set -euo pipefail
cd "${PROJECT:?set PROJECT to a project after make repro}"
O=(--overlay profiles/pixel-quality.yaml)
date; /usr/bin/time -f "pixel denoiser %e s" .venv/bin/python -m pipelines.train_ldm "${O[@]}"
date; .venv/bin/python -m pipelines.evaluate --family ldm "${O[@]}" --set evaluate.protocol=quick --guidance-sweep
# the chosen scale, or the exported one where no scale reached the class-accuracy floor
G=$(.venv/bin/python -c 'import json; r = json.load(open("metrics/eval/pixel-quality/quick/ldm_guidance.json")); print(r["chosen"] or r["exported_guidance"])')
echo "guidance: $G"
S=(--set "ldm.sampler.guidance_scale=$G")
.venv/bin/python -m pipelines.train_ldm "${O[@]}" "${S[@]}"   # the finished run resumes and re-exports at G
date; .venv/bin/python -m pipelines.evaluate --family ldm "${O[@]}" "${S[@]}" --set evaluate.protocol=quick
date; .venv/bin/python -m pipelines.evaluate --family ldm "${O[@]}" "${S[@]}"
date
