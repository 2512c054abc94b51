#!/usr/bin/env bash
# The LDM quality profile (profiles/ldm-quality.yaml) in PROJECT (a checkout after make repro), at the quick protocol
# (the standard one needs its reference statistics first: python -m pipelines.ref_stats --overlay profiles/ldm-quality.yaml).
#   PROJECT=/path/to/project benchmarks/ldm_quality.sh
set -euo pipefail
cd "${PROJECT:?set PROJECT to a project after make repro}"
O=(--overlay profiles/ldm-quality.yaml --set evaluate.protocol=quick)
date; /usr/bin/time -f "ae %e s" .venv/bin/python -m pipelines.train_autoencoder "${O[@]}"
date; .venv/bin/python -m pipelines.encode_latents "${O[@]}"
date; /usr/bin/time -f "ldm %e s" .venv/bin/python -m pipelines.train_ldm "${O[@]}"
date; .venv/bin/python -m pipelines.evaluate --family ldm --guidance-sweep --set "evaluate.guidance.scales=[1.5,2,3,4,6]" "${O[@]}"
date
