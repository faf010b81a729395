#!/usr/bin/env bash
# The MDM recipe pilot (issue 15, part 1): the demo's data and model (tiny-1m, 384-token BPE of the embedded
# Wikipedia corpus, seq 128, batch 32, lr 3e-3, low-discrepancy t), STEPS steps, evaluated every EVAL steps on
# 64 validation blocks with the true ELBO. Settings x seeds are ordinary `smdm train --resume` runs: kill and rerun
# this script to continue. Summarise with `python benchmarks/recipe_table.py runs/recipe`.
#   nice -n 19 bash benchmarks/recipe_pilot.sh            # ~15 min per run on a busy shared core
set -euo pipefail
WORK=${WORK:-runs/recipe}
STEPS=${STEPS:-300}
EVAL=${EVAL:-25}
SEEDS=${SEEDS:-"0 1"}
SETTINGS=${SETTINGS:-"base smdm-init ce smdm-init+ce"}
PY=${PY:-python}
mkdir -p "$WORK"
# shellcheck source=benchmarks/demo_tokens.sh
source "$(dirname "$0")/demo_tokens.sh"
for seed in $SEEDS; do
  for setting in $SETTINGS; do
    case $setting in
      base) extra=() ;;
      smdm-init) extra=(--init smdm) ;;
      ce) extra=(--loss-weighting ce) ;;
      smdm-init+ce) extra=(--init smdm --loss-weighting ce) ;;
      no-ld) extra=() ;;
      *) echo "unknown setting $setting" >&2; exit 2 ;;
    esac
    ld=(--low-discrepancy)
    [ "$setting" = no-ld ] && ld=()
    $PY -m smdm train --data "$WORK/tokens" --out "$WORK/$setting-s$seed" --model tiny-1m --objective mdm \
      --seq-len 128 --batch-size 32 --lr 3e-3 --max-steps "$STEPS" --eval-every "$EVAL" --eval-blocks 64 \
      --save-every 100 --seed "$seed" --threads 1 --no-progress --resume "${ld[@]}" "${extra[@]}" \
      > "$WORK/$setting-s$seed.log" 2>&1
  done
done
