#!/usr/bin/env bash
# Run the tiny-profile pipeline (`dvc repro`, both families) at two git revisions on this machine and
# compare their metrics: a refactor must leave every evaluation number unchanged.
#   benchmarks/compare_revisions.sh OLD_REV [NEW_REV]     (NEW_REV defaults to HEAD; needs .venv)
# Inception runs in fp32 so that both revisions measure alike on any CPU (ref_stats.inception.bf16: false before
# evaluation protocols existed, evaluate.protocols.quick.inception_precision: fp32 since), and the gate promotes anything.
set -euo pipefail
cd "$(dirname "$0")/.."
old=$1; new=${2:-HEAD}; work=$(mktemp -d /tmp/genforge-compare.XXXX); repo=$(pwd)
for rev in "$old" "$new"; do
  dir="$work/$rev"; git worktree add -f -q "$dir" "$rev"; ln -s "$repo/.venv" "$dir/.venv"
  .venv/bin/python - "$dir" <<'PY'
import sys, yaml
from pathlib import Path
dir = Path(sys.argv[1])
def merge(a, b):
    return {**a, **{k: merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v for k, v in b.items()}}
tiny = yaml.safe_load(Path("profiles/tiny.yaml").read_text())
base = yaml.safe_load((dir / "params.yaml").read_text())
extra = {"tracking": {"tracking_uri": f"sqlite:///{dir}/mlflow.db"},
         "registry": {"gan": {"fid_threshold": 1000.0}, "ldm": {"fid_threshold": 1000.0}}}
if "protocols" in base["evaluate"]:
    extra["evaluate"] = {"protocols": {"quick": {"inception_precision": "fp32"}}}
    floors = {"recall_floor": 0.0, "class_accuracy_floor": 0.0}
    extra["registry"] = {family: {**gate, **floors} for family, gate in extra["registry"].items()}
else:
    extra["ref_stats"] = {"inception": {"bf16": False}}
params = merge(merge(base, tiny), extra)
(dir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
PY
  (cd "$dir" && PATH="$repo/.venv/bin:$PATH" MLFLOW_DISABLE_TELEMETRY=true dvc repro > "$work/$rev.log" 2>&1) \
    || { echo "dvc repro failed at $rev: $work/$rev.log"; exit 1; }
done
status=0
find_metrics() {  # metrics/eval/<family>.json before protocols, metrics/eval/quick/<family>.json since
  local found; found=$(ls "$1/metrics/eval/quick/$2" 2>/dev/null || ls "$1/metrics/$2" 2>/dev/null || ls "$1/metrics/eval/$2" 2>/dev/null)
  echo "${found:-$1/metrics/$2}"
}
for file in gan.json ldm.json autoencoder.json; do
  if diff <(python3 -m json.tool --sort-keys "$(find_metrics "$work/$old" $file)") <(python3 -m json.tool --sort-keys "$(find_metrics "$work/$new" $file)") > /dev/null; then
    echo "metrics/$file: identical"
  else
    echo "metrics/$file: DIFFERS"; status=1
  fi
done
for file in gan_losses.csv ldm_losses.csv autoencoder_losses.csv; do  # the losses: every column but the last (img/s)
  if diff <(sed 's/,[^,]*$//' "$work/$old/metrics/$file") <(sed 's/,[^,]*$//' "$work/$new/metrics/$file") > /dev/null; then
    echo "metrics/$file losses: identical"
  else
    echo "metrics/$file losses: DIFFER"; status=1
  fi
done
git worktree remove --force "$work/$old"; git worktree remove --force "$work/$new"
exit $status
