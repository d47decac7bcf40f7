#!/usr/bin/env bash
# The evidence grid (issue 16) in one call on the GPU machine, from the repo root, with the GPU
# bundle on PYTHONPATH (CONTRIBUTING.md "On the GPU machine"):
#   bash tools/evidence_device.sh OUT_DIR [BUDGET_S]
# Runs the grid (python -m megatron_ham.evidence: 8 configurations x 3 seeds, the recipes'
# steps) and, with INSTABILITY=1, the controller reproduction (recipes/evidence/instability) at
# the same time (its 2026-12-02 traces are docs/results/instability.json). Haystacks are
# random ids (as ham-eval's default); for real text add --data-arg=--text=runs/sample/blend.json
# --data-arg=--haystack=mix after ham-prep-data --manifest sample --out runs/sample.
# What comes back (<= 8 files): OUT/gpu.txt, OUT/{grid,inst}/{runner.log,grid.json,evidence_runs.tar.gz}.
# As run on 2026-12-02 (docs/results.md): every run scored 0 recall, because ham-train's packing
# cut the recall documents (queries without their pairs) and the answers were ~1 % of an
# all-token loss. Now the runner packs whole documents into seq_length rows (recall_mixture
# --seq-length) and the recipes train on the answer tokens (data.loss_mask: blend, --loss-mask);
# the steps are fixed in recipes/evidence/_base.yaml (1200; no calibration, whose cold compiles
# cost the budget): ~3 min of compilation + 1200 x ~0.25 s for HAM with 24 processes at once.
# GPU memory for 24 processes at once is not measured: if they do not fit, lower --concurrency
# (a second wave doubles the time) or use --seeds 0,1.
# Every run compiles into one shared compile cache ($W/compile_cache, train.compile_cache_dir):
# processes of one kind after the first load its kernels, and a second call on the still-warm
# machine starts warm (docs/training.md "Compilation caches").
set -u
OUT=${1:?usage: evidence_device.sh OUT_DIR [BUDGET_S]}
BUDGET=${2:-560}
W=/tmp/evidence
mkdir -p "$W" "$OUT/grid" "$OUT/inst"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True TORCHINDUCTOR_COMPILE_THREADS=1 \
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
[ "${INSTABILITY:-0}" = 1 ] && python -m megatron_ham.evidence --out "$W/inst" --recipes recipes/evidence/instability --seeds 0 \
    --concurrency 2 --budget-s $((BUDGET - 40)) --reserve-s 60 --cache-dir "$W/cache" --data-workers 2 \
    --heldout-tokens 50000 --data-arg=--lengths=127,255 --data-arg=--num-pairs=16 \
    --data-arg=--mix=mqar=0.7,niah_multikey=0.3 --data-arg=--num-needles=2,4 \
    --final-lengths 512,1k --over-lengths 512 --kv-sweep-configs "" --export "$OUT/inst" \
    --override "train.compile_cache_dir=$W/compile_cache" \
    > "$OUT/inst/runner.log" 2>&1 &
python -m megatron_ham.evidence --out "$W/grid" --seeds 0,1,2 --concurrency 24 --budget-s "$BUDGET" \
    --reserve-s 90 --data-workers 12 --data-arg=--lengths=255,511,1023 \
    --data-arg=--num-pairs=8,16,32 --data-arg=--mix=mqar=0.6,niah_single=0.1,niah_multikey=0.2,niah_multivalue=0.1 \
    --over-lengths 1k --eval-batch-size 8 --prune \
    --cache-dir "$W/cache" --override "train.compile_cache_dir=$W/compile_cache" \
    --export "$OUT/grid" > "$OUT/grid/runner.log" 2>&1
wait
