#!/usr/bin/env bash
# The LDM quality profile (profiles/ldm-quality.yaml) in PROJECT (a checkout after make repro).
#   PROJECT=/path/to/project benchmarks/ldm_quality.sh                     # quick protocol, guidance sweep 1.5..6
#   PROTOCOL=standard SCALES= PROJECT=... benchmarks/ldm_quality.sh        # standard protocol, at the profile's guidance only
#   SETS="ldm.total_steps=4000 ldm.sampler.guidance_scale=1.5" PROJECT=... benchmarks/ldm_quality.sh   # the profile changed (--set each)
# The standard protocol needs its reference statistics first: python -m pipelines.ref_stats --overlay profiles/ldm-quality.yaml
set -euo pipefail
cd "${PROJECT:?set PROJECT to a project after make repro}"
PROTOCOL=${PROTOCOL:-quick}
SCALES=${SCALES-[1.5,2,3,4,6]}
O=(--overlay profiles/ldm-quality.yaml --set "evaluate.protocol=$PROTOCOL")
for s in ${SETS:-}; do O+=(--set "$s"); done
date; /usr/bin/time -f "ae %e s" .venv/bin/python -m pipelines.train_autoencoder "${O[@]}"
date; .venv/bin/python -m pipelines.encode_latents "${O[@]}"
date; /usr/bin/time -f "guide %e s" .venv/bin/python -m pipelines.train_ldm "${O[@]}" --overlay profiles/ldm-quality-guide.yaml
date; /usr/bin/time -f "ldm %e s" .venv/bin/python -m pipelines.train_ldm "${O[@]}"
if [ -n "$SCALES" ]; then
  date; .venv/bin/python -m pipelines.evaluate --family ldm --guidance-sweep --set "evaluate.guidance.scales=$SCALES" "${O[@]}"
else
  date; .venv/bin/python -m pipelines.evaluate --family ldm "${O[@]}"
fi
date
