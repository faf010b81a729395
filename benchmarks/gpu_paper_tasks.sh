#!/usr/bin/env bash
# The two measurements the CPU cannot make (issues: sampling speed/quality target, reversal curse), sized for one
# GPU session (~10 min on an H100/H200 after the first call's start-up). Each part writes JSON next to its log.
#
#   A. benchmarks/sampling.py with a model pair large enough to be confident: tiny-12m, 256-token sequences,
#      batch 64, TRAIN_STEPS steps on the embedded corpus (the demo's data, tokenizer and diffusion recipe: simple
#      CE, masking rates in [0.3, 0.8]), timed on the GPU; with BDMs of the block sizes in BDM_SIZES (default 4 16)
#      at equal training compute, by the same recipe (issue 16's speed / quality frontier).
#   B. smdm task reversal, MDM and ARM fine-tuned the same way (REV_EPOCHS epochs) from part A's pre-trained pair
#      when it is there (the paper's shape: pre-train, then learn the facts), else REV_MODEL from scratch;
#      evaluated on the four test files with likelihood ranking. On 2 CPU cores, tiny-1m from scratch ranks the
#      right name 32% of the time in reverse (ARM: chance) but generates it 0% of the time (docs/reversal.md).
#
# Usage: bash benchmarks/gpu_paper_tasks.sh [A|B|AB]   (env: PYTHON, WORK, TRAIN_STEPS, REPEATS, BDM_SIZES,
#        RNG_DEVICE=cpu|model, REV_MODEL, REV_EPOCHS; docs/gpu.md has the durations measured on an H200)
# SMOKE=1 runs the same plumbing on a CPU in a few minutes with toy sizes (what CI-less checks can do here).
# Offline machines (the lent device reaches nothing and sees no ../shared): copy the inputs into an ignored folder
# first and carry it, e.g.  mkdir -p runs/gpu-inputs && cp -r ../shared/data/reversal_curse runs/cache/*.json
# runs/gpu-inputs/  then run with DATA=runs/gpu-inputs/reversal_curse CORPUS_JSON=runs/gpu-inputs/summaries_en-us.json
set -euo pipefail
cd "$(dirname "$0")/.."
PARTS=${1:-AB}
PYTHON=${PYTHON:-python}
WORK=${WORK:-/tmp/smdm_gpu_tasks}
DATA=${DATA:-../shared/data/reversal_curse}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ "${SMOKE:-0}" == 1 ]]; then
    DEVICE=cpu; MODEL=tiny-test; BATCH=4; TRAIN_STEPS=${TRAIN_STEPS:-4}; SAMPLES=2; LENGTH=32; BLOCK=8; SEQ=64
    REV_MODEL=${REV_MODEL:-tiny-test}; REV_EPOCHS=${REV_EPOCHS:-0.02}; LIMIT="--limit 4"; RANK=4; THREADS="--threads 1"
    BDM_SIZES=${BDM_SIZES:-4}
else
    "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_paper_tasks: no CUDA device')"
    "$PYTHON" -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name(0))"
    DEVICE=cuda; MODEL=tiny-12m; BATCH=64; TRAIN_STEPS=${TRAIN_STEPS:-3000}; SAMPLES=64; LENGTH=256; BLOCK=32; SEQ=256
    REV_MODEL=${REV_MODEL:-tiny-12m}; REV_EPOCHS=${REV_EPOCHS:-200}; LIMIT=""; RANK=60; THREADS=""
    BDM_SIZES=${BDM_SIZES:-4 16}
fi
mkdir -p "$WORK"
CORPUS_JSON=${CORPUS_JSON:-runs/cache/summaries_en-us.json}
if [[ -f "$CORPUS_JSON" ]]; then  # the embedded corpus where benchmarks/sampling.py looks for it: no download
    mkdir -p "$WORK/cache" && cp "$CORPUS_JSON" "$WORK/cache/"
fi

if [[ "$PARTS" == *A* ]]; then
    "$PYTHON" benchmarks/sampling.py --work-dir "$WORK/sampling" --model "$MODEL" --batch-size "$BATCH" \
        --train-steps "$TRAIN_STEPS" --seq-len "$SEQ" --device "$DEVICE" --samples "$SAMPLES" --length "$LENGTH" \
        --block-length "$BLOCK" --repeats "${REPEATS:-2}" --json "$WORK/sampling.json" --recipe demo \
        --rng-device "${RNG_DEVICE:-cpu}" \
        --bdm-block-sizes $BDM_SIZES $THREADS 2>&1 | tee "$WORK/sampling.log"
fi

if [[ "$PARTS" == *B* ]]; then
    for objective in mdm arm; do
        start=(--model "$REV_MODEL")
        pretrained="$WORK/sampling/$objective"
        [[ "$objective" == mdm ]] && pretrained="$WORK/sampling/mdm-demo-recipe"
        if [[ -f "$pretrained/summary.json" ]]; then
            start=(--init-from "$pretrained/checkpoint")
        fi
        "$PYTHON" -m smdm task reversal --data-dir "$DATA" --out "$WORK/reversal-$objective" "${start[@]}" \
            --objective "$objective" --epochs "$REV_EPOCHS" --batch-size "$BATCH" --lr 1e-3 --device "$DEVICE" \
            --rank "$RANK" --eval-batch-size 300 --no-progress $LIMIT $THREADS 2>&1 | tee "$WORK/reversal-$objective.log"
    done
fi
echo "results under $WORK"
