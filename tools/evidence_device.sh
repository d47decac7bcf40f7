#!/usr/bin/env bash
# The evidence grid (issue 16) on the GPU machine, from the repo root, with the GPU bundle on
# PYTHONPATH (CONTRIBUTING.md "On the GPU machine"):
#   bash tools/evidence_device.sh OUT_DIR [BUDGET_S] [CONCURRENCY] [PART]
# PART: grid (default) | transformer_lr (the grid's Transformer at three learning rates) | long
# (the grid's models on 511-1023-token documents); each one device call, as run on 2026-12-02:
#   grid twice with 545 12, transformer_lr with 380 6, long with 285 3 (docs/results/notes.md).
# The grid (python -m megatron_ham.evidence: the 10 configurations of recipes/evidence/ x 3
# seeds, the recipes' 800 steps, 2400 for transformer_long) in runs/evidence-gpu, a directory of the checkout that a warm
# machine keeps between calls: the runner is resumable, so when one call's budget does not
# cover the grid, the same command again goes on (finished runs are skipped, stopped trainings
# resume from their checkpoint, a stopped run's final report is redone). With INSTABILITY=1 the
# controller reproduction (recipes/evidence/instability) runs at the same time (its 2026-12-02
# traces are docs/results/instability.json).
# Data: MQAR (8 / 16 pairs) and multi-key needles (2 / 4) in 63-255-token documents of random
# ids, 512-token vocabulary, answer-token loss; evaluation at 256-4k tokens (up to 16x the trained
# document length; 8x the trained context), MQAR with 16 pairs and 4 needles (ham-eval's defaults).
# What comes back: OUT/gpu.txt, OUT/grid/{runner.log,grid.json,evidence_runs.tar.gz} (and OUT/inst).
# The d = 512 grid of 2026-12-02 (9 configurations, 27 runs; docs/results/grid_d512.json) took
# `INSTABILITY=1 bash tools/evidence_device.sh $OUT 540 12` twice in a row on one warm H200
# (548 s + 365 s); ~0.25-0.3 s/step for HAM with 12 processes on the card.
# Every run compiles into one shared compile cache (train.compile_cache_dir); --stagger (the
# runner's default) starts the other seeds of a configuration after its first run's first step.
set -u
OUT=${1:?usage: evidence_device.sh OUT_DIR [BUDGET_S] [CONCURRENCY] [grid|transformer_lr|long]}
BUDGET=${2:-560}
CONC=${3:-12}
PART=${4:-grid}
W=runs/evidence-gpu
mkdir -p "$W" "$OUT/$PART"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True TORCHINDUCTOR_COMPILE_THREADS=1 \
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
if [ "${INSTABILITY:-0}" = 1 ]; then
  mkdir -p "$OUT/inst"
  python -m megatron_ham.evidence --out "$W/inst" --recipes recipes/evidence/instability --seeds 0 \
    --concurrency 3 --budget-s $((BUDGET - 40)) --reserve-s 60 --cache-dir "$W/cache" --data-workers 2 \
    --heldout-tokens 50000 --data-arg=--lengths=127,255 --data-arg=--num-pairs=16 \
    --data-arg=--mix=mqar=0.7,niah_multikey=0.3 --data-arg=--num-needles=2,4 \
    --final-lengths 512,1k --over-lengths 512 --kv-sweep-configs "" --export "$OUT/inst" \
    --override "train.compile_cache_dir=$W/compile_cache" \
    > "$OUT/inst/runner.log" 2>&1 &
fi
# the recall mixture of every part but the document lengths
MIX=(--data-arg=--num-pairs=8,16 --data-arg=--mix=mqar=0.75,niah_multikey=0.25 --data-arg=--num-needles=2,4
     --data-workers 12 --heldout-tokens 100000 --prune --cache-dir "$W/cache"
     --override "train.compile_cache_dir=$W/compile_cache" --export "$OUT/$PART")
case "$PART" in
  grid)  # recipes/evidence: 10 configurations x 3 seeds
    ARGS=(--recipes recipes/evidence --seeds 0,1,2 --reserve-s 45 --data-arg=--lengths=63,127,255
          --over-lengths 512 --final-lengths 256,512,1k,2k,4k --eval-batch-size 16
          --kv-sweep-configs ham_learned_f25,ham_learnederr_f25,ham_random_f25) ;;
  transformer_lr)  # the grid's Transformer at lr 3e-4 / 1e-3 / 4e-3, 2400 steps, 2 seeds (~300 s)
    ARGS=(--recipes recipes/evidence/transformer_lr --seeds 0,1 --reserve-s 40 --data-arg=--lengths=63,127,255
          --over-lengths 512 --final-lengths 256,512,1k,2k,4k --eval-batch-size 16 --kv-sweep-configs "") ;;
  long)  # 511-1023-token documents in 2048-token rows, 600 steps, 1 seed (~280 s)
    ARGS=(--recipes recipes/evidence/long --seeds 0 --reserve-s 35 --data-arg=--lengths=511,1023
          --over-lengths 1k --final-lengths 1k,2k,4k,8k --eval-batch-size 8 --kv-sweep-configs "") ;;
  *) echo "evidence_device.sh: unknown part '$PART' (grid | transformer_lr | long)" >&2; exit 2 ;;
esac
python -m megatron_ham.evidence --out "$W/$PART" --concurrency "$CONC" --budget-s "$BUDGET" "${ARGS[@]}" "${MIX[@]}" \
    >> "$OUT/$PART/runner.log" 2>&1
wait
