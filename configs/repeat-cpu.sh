#!/usr/bin/env bash
# The data-constrained study of docs/data-constrained.md: MDMs and ARMs trained for 1..64 epochs over U unique
# tokens of the embedded Wikipedia corpus (the demo's 384-token BPE), U x epochs x sizes x families as ordinary
# resumable `smdm train` runs. SPEC=configs/repeat-pilot.json runs the small pilot instead. Rerun after an
# interruption: finished runs are skipped and killed ones resume from their checkpoints.
#   nice -n 19 bash configs/repeat-cpu.sh
set -euo pipefail
SMDM=${SMDM:-smdm}
PY=${PY:-python}
SPEC=${SPEC:-configs/repeat-cpu.json}
WORK=${WORK:-runs/repeat}
NAME=$(basename "$SPEC" .json)
mkdir -p "$WORK"
source benchmarks/demo_tokens.sh  # the demo's data in $WORK, made once
[ -f "$WORK/$NAME-manifest.json" ] || $SMDM scale repeat plan "$SPEC" --out "$WORK/$NAME-manifest.json"
$SMDM scale repeat run "$WORK/$NAME-manifest.json" --jobs "${JOBS:-2}" --threads 1
$SMDM scale repeat fit "$WORK/$NAME-manifest.json" --out "$WORK/$NAME-fit"
