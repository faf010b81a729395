# Sourced by the recipe studies: the demo's data in $WORK (the embedded corpus, its 384-token BPE, 2% validation),
# made once and reused, and the demo's training setting and recipe (smdm/demo.py) for the studies that compare
# runs with it (benchmarks/bdm_recipe.sh, benchmarks/bdm_from_mdm.sh). Needs WORK and PY.
if [ ! -f "$WORK/tokens/manifest.json" ]; then
  CORPUS=$($PY -c "from pathlib import Path; from smdm.corpus import default_corpus; print(default_corpus(Path('runs/cache')))")
  $PY -m smdm tokenizer train --input "$CORPUS" --vocab-size 384 --out "$WORK/tokenizer.json"
  $PY -m smdm prepare --input "$CORPUS" --tokenizer "$WORK/tokenizer.json" --out "$WORK/tokens" --val-fraction 0.02
fi
# shellcheck disable=SC2034  # used by the scripts that source this file
demo_setting=(--data "$WORK/tokens" --model tiny-1m --seq-len 128 --batch-size 32 --lr 3e-3 --eval-blocks 64
              --threads 1 --no-progress --resume)
# shellcheck disable=SC2034
demo_recipe=(--loss-weighting ce --mask-rate-min 0.3 --mask-rate-max 0.8)  # the MDM's also has --low-discrepancy
