#!/usr/bin/env bash
# Issue 16's equal-compute target (BDM validation bound between the ARM's and the MDM's) with the recipe of issue 15:
# the demo's setting (tiny-1m, the embedded corpus and its 384-token BPE, 32 x 128 tokens, lr 3e-3, stratified t),
# the ARM and the demo-recipe MDM for STEPS steps, each BDM for STEPS/2 (a BDM token costs two passes: equal FLOPs),
# once with the plain 1/t ELBO over t in (0, 1] and once with the MDM's winning recipe (simple CE, rates in
# [0.3, 0.8]). Every run is an ordinary `smdm train --resume` run: kill and rerun to continue; JOBS runs side by side.
# SIZES=" " trains no BDM, ARM=0 no ARM.
# Validation is the same for every recipe (the exact NLL for the ARM, the unclipped ELBO for the others).
#   nice -n 19 bash benchmarks/bdm_recipe.sh && python benchmarks/recipe_table.py runs/bdm-recipe
set -euo pipefail
WORK=${WORK:-runs/bdm-recipe}
STEPS=${STEPS:-900}
SEED=${SEED:-0}
SIZES=${SIZES:-"4 8 16"}
JOBS=${JOBS:-2}
PY=${PY:-python}
mkdir -p "$WORK"
# shellcheck source=benchmarks/demo_tokens.sh
source "$(dirname "$0")/demo_tokens.sh"
recipe=("${demo_recipe[@]}")
runs=("mdm-recipe mdm $STEPS ${recipe[*]}")  # the MDM first: bdm_from_mdm.sh branches from it
[ "${ARM:-1}" = 0 ] || runs+=("arm arm $STEPS")  # ARM=0: without the ARM (a comparison of diffusion runs only)
for size in $SIZES; do
  runs+=("bdm$size-plain bdm $((STEPS / 2)) --diffusion-block-size $size")
  runs+=("bdm$size-recipe bdm $((STEPS / 2)) --diffusion-block-size $size ${recipe[*]}")
done
for run in "${runs[@]}"; do
  read -r name objective steps extra <<<"$run"
  [ -f "$WORK/$name-s$SEED/summary.json" ] && continue
  ld=(--low-discrepancy)
  [ "$objective" = arm ] && ld=()
  # shellcheck disable=SC2086  # $extra holds several flags
  $PY -m smdm train "${demo_setting[@]}" --out "$WORK/$name-s$SEED" --objective "$objective" --max-steps "$steps" \
    --eval-every 75 --save-every 75 --seed "$SEED" "${ld[@]}" $extra > "$WORK/$name-s$SEED.log" 2>&1 &
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 5; done
done
wait
