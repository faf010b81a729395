#!/usr/bin/env bash
# Issue 16's equal-compute target by BD3-LM's own training route: Arriola et al. (ICLR 2025; kuleshov-group/bd3lms)
# pre-train an MDLM and fine-tune it into block diffusion (850k + 150k steps). Here, in the setting of
# benchmarks/bdm_recipe.sh (tiny-1m, demo corpus, 32 x 128 tokens, lr 3e-3, the recipe of issue 15), with the same
# total compute as that script's STEPS-step ARM and MDM: the MDM run is branched at step PRE (replayed to it from its
# own train_config.json; training is deterministic, so the branch is that run's state at PRE), and a BDM of each
# block size is fine-tuned from the branch for FT steps, with FT / PRE = 150 / 850 and PRE + 2 FT = STEPS (a BDM
# step costs two passes). BRANCH=own trains a separate PRE-step MDM instead (its own, shorter, cosine schedule).
# Needs the MDM run of benchmarks/bdm_recipe.sh started (its config) in the same WORK. Resumable: rerun to continue.
#   nice -n 19 bash benchmarks/bdm_from_mdm.sh && python benchmarks/recipe_table.py runs/bdm-recipe
set -euo pipefail
WORK=${WORK:-runs/bdm-recipe}
STEPS=${STEPS:-900}
SEED=${SEED:-0}
SIZES=${SIZES:-"4 8 16"}
BRANCH=${BRANCH:-replay}
PY=${PY:-python}
FT=$((STEPS * 150 / 1150))
PRE=$((STEPS - 2 * FT))
config="$WORK/mdm-recipe-s$SEED/train_config.json"
if [ "$BRANCH" = replay ] && [ ! -f "$config" ]; then
  echo "bdm_from_mdm.sh: $config is missing; start benchmarks/bdm_recipe.sh first" >&2
  exit 2
fi
mkdir -p "$WORK"
# shellcheck source=benchmarks/demo_tokens.sh
source "$(dirname "$0")/demo_tokens.sh"
common=("${demo_setting[@]}" --seed "$SEED" "${demo_recipe[@]}" --low-discrepancy)
if [ "$BRANCH" = replay ]; then
  pre="$WORK/mdm-recipe-s$SEED-at$PRE"
  [ -f "$pre/summary.json" ] || $PY -m smdm train --config "$config" --out "$pre" --stop-after-steps "$PRE" \
    --resume --no-progress > "$pre.log" 2>&1
  tag=br
else
  pre="$WORK/mdm-pre$PRE-s$SEED"
  [ -f "$pre/summary.json" ] || $PY -m smdm train "${common[@]}" --out "$pre" --objective mdm --max-steps "$PRE" \
    --eval-every 74 --save-every 74 > "$pre.log" 2>&1
  tag=ft
fi
for size in $SIZES; do
  out="$WORK/bdm$size-$tag$FT-s$SEED"
  [ -f "$out/summary.json" ] && continue
  $PY -m smdm train "${common[@]}" --out "$out" --objective bdm --diffusion-block-size "$size" \
    --init-from "$pre/checkpoint" --max-steps "$FT" --eval-every 39 --save-every 39 > "$out.log" 2>&1
done
