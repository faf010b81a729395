#!/usr/bin/env bash
# The CPU-scale IsoFLOP sweep of docs/scaling.md: 4 budgets (1e11..3e12 FLOPs) x 5 sizes x {MDM, ARM} = 40 runs of
# tiny models (18k..620k non-embedding parameters) on Wikipedia summaries + State of the Union addresses.
# About 15 minutes of two idle cores; three times that when the cores are shared. Every step is resumable: rerun
# the script after an interruption and finished work is reused.
set -euo pipefail
SMDM=${SMDM:-smdm}
DATA=${DATA:-../shared/data}           # wiki_summaries/ and state_of_the_union/ from ../shared/data
WORK=${WORK:-runs/scaling}
CORPUS=("$DATA/wiki_summaries/summaries_en-us.json" "$DATA/state_of_the_union")
mkdir -p "$WORK"
[ -f "$WORK/tokenizer.json" ] || $SMDM tokenizer train --input "${CORPUS[@]}" --vocab-size 512 --out "$WORK/tokenizer.json"
[ -f "$WORK/tokens/manifest.json" ] || $SMDM prepare --input "${CORPUS[@]}" --tokenizer "$WORK/tokenizer.json" \
    --out "$WORK/tokens" --val-fraction 0.01
[ -f "$WORK/manifest.json" ] || $SMDM scale plan configs/scaling-cpu.json --out "$WORK/manifest.json"
$SMDM scale run "$WORK/manifest.json" --jobs 2 --threads 1
$SMDM scale fit "$WORK/manifest.json" --out "$WORK/fit" --irreducible
