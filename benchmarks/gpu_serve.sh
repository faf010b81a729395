#!/usr/bin/env bash
# Issue 14's batching target on a GPU (16 concurrent clients: batching >= 3x the requests/s of one-at-a-time serving,
# nothing lost): benchmarks/serve.py with the servers on CUDA, MDM (dual cache) and ARM (KV cache), 1 to 64 clients.
# About 1-2 minutes on an H100/H200 after start-up. The lent device reaches no package index: when fastapi/uvicorn
# are missing there, they are installed from WHEELS (made here beforehand, for the CPython versions it may have):
#   for v in 3.10 3.11 3.12 3.13; do pip download "fastapi>=0.110" "uvicorn>=0.29" --only-binary=:all: \
#       --python-version $v --platform manylinux2014_x86_64 --implementation cp -d runs/gpu-inputs/wheels; done
# then carry runs/gpu-inputs. Usage: bash benchmarks/gpu_serve.sh   (env: PYTHON, WHEELS, OUT, MODEL, CLIENTS)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
WHEELS=${WHEELS:-runs/gpu-inputs/wheels}
OUT=${OUT:-/tmp/smdm_gpu_serve}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DEVICE=${DEVICE:-cuda}
if [[ "$DEVICE" == cuda ]]; then
    "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_serve: no CUDA device')"
    "$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '|', torch.cuda.get_device_name(0))"
fi
if ! "$PYTHON" -c "import fastapi, uvicorn" 2>/dev/null; then
    [[ -d "$WHEELS" ]] || { echo "gpu_serve: fastapi/uvicorn missing and no wheels in $WHEELS" >&2; exit 2; }
    "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" "fastapi>=0.110" "uvicorn>=0.29"
fi
mkdir -p "$OUT"
for model in ${MODEL:-tiny-1m tiny-12m}; do
    "$PYTHON" benchmarks/serve.py --device "$DEVICE" --model "$model" --clients "${CLIENTS:-1,4,16,64}" \
        --requests 64 --repeats 3 --json "$OUT/serve-$model.json" | tee "$OUT/serve-$model.log"
done
