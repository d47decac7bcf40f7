#!/usr/bin/env bash
# The evidence grid (issue 16) in one call on the GPU machine, from the repo root, with the GPU
# bundle on PYTHONPATH (CONTRIBUTING.md "On the GPU machine"):
#   bash tools/evidence_device.sh OUT_DIR [BUDGET_S]
# Runs, at once: the grid (python -m megatron_ham.evidence: 8 configurations x 3 seeds, steps fit
# to the budget by a calibration) and the controller reproduction (recipes/evidence/instability).
# The sample corpus (for real-text filler) must be prepared beforehand in runs/sample
# (ham-prep-data --manifest sample --out runs/sample; the GPU machine lacks zstandard).
# What comes back (<= 8 files): OUT/gpu.txt, OUT/{grid,inst}/{runner.log,grid.json,evidence_runs.tar.gz}.
# As run on 2026-12-02 (docs/results.md): the calibration's cold compilation (~160 s per GDN/HAM
# process) left 200 steps. Next time fix the steps instead (no --calibrate-steps), e.g.
# --seeds 0,1 --concurrency 16 --override train.train_steps=1500 --override checkpoint.interval=375
# --override train.eval_interval=300 --override train.warmup_steps=75 (~7.5 GiB per process).
# Every run compiles into one shared compile cache ($W/compile_cache, train.compile_cache_dir):
# processes of one kind after the first load its kernels, and a second call on the still-warm
# machine starts warm (docs/training.md "Compilation caches").
set -u
OUT=${1:?usage: evidence_device.sh OUT_DIR [BUDGET_S]}
BUDGET=${2:-520}
W=/tmp/evidence
mkdir -p "$W" "$OUT/grid" "$OUT/inst"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True TORCHINDUCTOR_COMPILE_THREADS=1 \
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python -m megatron_ham.evidence --out "$W/inst" --recipes recipes/evidence/instability --seeds 0 \
    --concurrency 2 --budget-s $((BUDGET - 40)) --reserve-s 60 --cache-dir "$W/cache" --data-workers 2 \
    --heldout-tokens 50000 --data-arg=--lengths=256,512 --data-arg=--num-pairs=16 \
    --data-arg=--mix=mqar=0.7,niah_multikey=0.3 --data-arg=--num-needles=2,4 \
    --final-lengths 512,1k --over-lengths 512 --kv-sweep-configs "" --export "$OUT/inst" \
    --override "train.compile_cache_dir=$W/compile_cache" \
    > "$OUT/inst/runner.log" 2>&1 &
python -m megatron_ham.evidence --out "$W/grid" --seeds 0,1,2 --concurrency 27 --budget-s "$BUDGET" \
    --reserve-s 120 --calibrate-steps 30 --min-steps 200 --max-steps 1500 --data-workers 12 \
    --data-arg=--text=runs/sample/blend.json --data-arg=--haystack=mix \
    --data-arg=--tokenizer=data_prep/sample/tokenizer --eval-batch-size 8 --prune \
    --cache-dir "$W/cache" --override "train.compile_cache_dir=$W/compile_cache" \
    --export "$OUT/grid" > "$OUT/grid/runner.log" 2>&1
wait
