#!/usr/bin/env bash
# Learning rate, warmup and batch size tuned for BOTH families at the same effort (issue 15, part 1): the demo's
# data and model (tiny-1m, 384-token BPE of the embedded Wikipedia corpus, seq 128), a fixed token budget
# (TOKENS, default 3,686,400 = the demo's 900 steps x 32 x 128) whatever the batch size, evaluated EVAL_TOKENS apart
# with the true validation loss (the MDM's ELBO). The MDM uses the pilot's best objective (simple CE, stratified t).
# Each line of GRID is "objective lr warmup_fraction batch seed [further smdm train flags]" (the flags also name
# the run, e.g. "mdm 3e-3 0.1 32 0 --mask-rate-min 0.3 --mask-rate-max 0.8"); every run is an ordinary `smdm train --resume`
# run, JOBS at a time: kill this script and rerun it to continue. Summarise with
#   python benchmarks/recipe_table.py runs/tune
#   GRID="mdm 3e-3 0.01 32 0" nice -n 19 bash benchmarks/recipe_tune.sh       # one run
set -euo pipefail
WORK=${WORK:-runs/tune}
DATA=${DATA:-runs/recipe/tokens}
TOKENS=${TOKENS:-3686400}
EVAL_TOKENS=${EVAL_TOKENS:-204800}
JOBS=${JOBS:-2}
PY=${PY:-python}
GRID=${GRID:-"$(for lw in "1e-2 0.01" "1e-3 0.01" "1e-2 0.1" "1e-3 0.1" "3e-3 0.1" "3e-3 0.01"; do
  for obj in mdm arm; do echo "$obj $lw 32 0"; done; done)"}
if [ ! -f "$DATA/manifest.json" ]; then
  root=$(dirname "$DATA")
  mkdir -p "$root"
  CORPUS=$($PY -c "from pathlib import Path; from smdm.corpus import default_corpus; print(default_corpus(Path('runs/cache')))")
  $PY -m smdm tokenizer train --input "$CORPUS" --vocab-size 384 --out "$root/tokenizer.json"
  $PY -m smdm prepare --input "$CORPUS" --tokenizer "$root/tokenizer.json" --out "$DATA" --val-fraction 0.02
fi
mkdir -p "$WORK"
one_run() {
  local obj=$1 lr=$2 warm=$3 batch=$4 seed=$5
  shift 5
  local flags=("$@") tag
  tag=$(printf '%s' "${flags[*]}" | sed 's/--//g; s/ //g')
  local steps=$(( TOKENS / (batch * 128) ))
  local eval=$(( EVAL_TOKENS / (batch * 128) ))
  local warmup
  warmup=$(python3 -c "print(round($warm * $steps))")
  local name="$obj-lr$lr-w$warm-b$batch-s$seed${tag:+-$tag}"
  local extra=()
  [ "$obj" = mdm ] && extra=(--low-discrepancy --loss-weighting ce)
  $PY -m smdm train --data "$DATA" --out "$WORK/$name" --model tiny-1m --objective "$obj" --seq-len 128 \
    --batch-size "$batch" --lr "$lr" --warmup-steps "$warmup" --max-steps "$steps" --eval-every "$eval" \
    --eval-blocks 64 --save-every "$eval" --seed "$seed" --threads 1 --no-progress --resume "${extra[@]}" "${flags[@]}" \
    > "$WORK/$name.log" 2>&1 && echo "done $name" || echo "FAILED $name (see $WORK/$name.log)"
}
export -f one_run
export WORK DATA TOKENS EVAL_TOKENS PY
echo "$GRID" | xargs -P "$JOBS" -L 1 bash -c 'one_run "$@"' _
