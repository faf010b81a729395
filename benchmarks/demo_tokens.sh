# Sourced by the recipe studies: the demo's data in $WORK (the embedded corpus, its 384-token BPE, 2% validation),
# made once and reused. Needs WORK and PY.
if [ ! -f "$WORK/tokens/manifest.json" ]; then
  CORPUS=$($PY -c "from pathlib import Path; from smdm.corpus import default_corpus; print(default_corpus(Path('runs/cache')))")
  $PY -m smdm tokenizer train --input "$CORPUS" --vocab-size 384 --out "$WORK/tokenizer.json"
  $PY -m smdm prepare --input "$CORPUS" --tokenizer "$WORK/tokenizer.json" --out "$WORK/tokens" --val-fraction 0.02
fi
