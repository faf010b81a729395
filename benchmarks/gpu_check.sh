#!/usr/bin/env bash
# GPU check (<= 5 minutes on an H100/H200): train the paper's 170M MDM at sequence length 2048 in bf16 for a few
# hundred steps on random tokens, then print tokens/s, MFU and peak memory from the run's metrics.
# Needs torch (CUDA), numpy, safetensors, tqdm, tokenizers and sentencepiece in $PYTHON (carry wheels to an offline
# machine that lacks them). Usage: bash benchmarks/gpu_check.sh [extra `smdm train` flags]   (env: STEPS=300 BATCH=16 PYTHON=python)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
STEPS=${STEPS:-300}
BATCH=${BATCH:-16}
WORK=${WORK:-/tmp/smdm_gpu_check}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device')"
"$PYTHON" -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name(0))"
rm -rf "$WORK" && mkdir -p "$WORK"
"$PYTHON" benchmarks/synthetic_tokens.py --out "$WORK/data" --train-tokens $((STEPS * BATCH * 2048 + 4096)) \
    --val-tokens 200000
"$PYTHON" -m smdm train --data "$WORK/data" --out "$WORK/run" --model smdm-170m --seq-len 2048 \
    --batch-size "$BATCH" --max-steps "$STEPS" --dtype bf16 --compile --log-every 10 --eval-every 1000000 \
    --eval-blocks 8 --save-every 1000000 --random-length-prob 0 "$@"
"$PYTHON" - "$WORK/run/metrics.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if '"tokens_per_s"' in line]
steady = rows[len(rows) // 3:]  # skip compilation and warm-up
tps = statistics.median(r["tokens_per_s"] for r in steady)
print(f"steady-state tokens/s: {tps:,.0f} (median of {len(steady)} logging windows)")
if "mfu" in steady[-1]:
    print(f"MFU: {statistics.median(r['mfu'] for r in steady):.1%}")
print(f"peak memory: {max(r.get('peak_memory_gb', 0) for r in rows):.1f} GiB")
PY
