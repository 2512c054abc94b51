#!/usr/bin/env bash
# The pixel-space EDM baseline (profiles/pixel-quality.yaml) in PROJECT (a checkout after make repro that has the
# standard reference: python -m pipelines.ref_stats --overlay profiles/ldm-quality.yaml): train, then evaluate at the
# quick and the standard protocol (metrics/eval/pixel-quality/<protocol>/ldm.json).
#   PROJECT=/path/to/project benchmarks/pixel_quality.sh
set -euo pipefail
cd "${PROJECT:?set PROJECT to a project after make repro}"
O=(--overlay profiles/pixel-quality.yaml)
date; /usr/bin/time -f "pixel denoiser %e s" .venv/bin/python -m pipelines.train_ldm "${O[@]}"
date; .venv/bin/python -m pipelines.evaluate --family ldm "${O[@]}" --set evaluate.protocol=quick
date; .venv/bin/python -m pipelines.evaluate --family ldm "${O[@]}"
date
