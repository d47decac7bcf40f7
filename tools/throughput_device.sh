#!/usr/bin/env bash
# Issue 15's measurements in one call on the GPU machine, from the repo root, with the GPU bundle
# on PYTHONPATH (CONTRIBUTING.md "On the GPU machine"; build it first: bash ../shared/gpu/build-bundle):
#
#   mkdir -p /tmp/site && tar -xJf .gpu/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD || exit;
#   bash tools/throughput_device.sh $OUT [DEADLINE_S] [STAGES]
#
# DEADLINE_S (default 540): seconds this script may use; a stage starts only with >= 60 s left and
# is cut at the deadline (what it finished is still under OUT). STAGES (default, in priority order):
#   ham_bench            bench_recipes.py ham_800m, both modes, with an EMPTY compile cache:
#                        its mbs1 run is the COLD time to first step (ttfs), its recipe-mode run
#                        (32 micro-batches per step) starts WARM from the cache the first one filled
#   ham_profile          profile_step.py ham_800m (warm cache), 1 profiled step at the recipe's
#                        global batch (32 rows: a 4-row profile understates the scratchpad ~20 %,
#                        its cost depends on the rows' documents; docs/benchmarks.md 2026-12-04)
#   transformer_profile  profile_step.py transformer_800m, the same
#   transformer_bench    bench_recipes.py transformer_800m, both modes (the baseline of the ratios)
# With 2+ GPUs the HAM stages run on GPU 0 and the Transformer stages on GPU 1 at the same time
# (same host, same minutes); with one GPU they run one after the other (expect ~7-8 min for the
# HAM stages alone: the cold compile is ~5 min; a second call on the still-warm machine can run
# the rest: the cache lives in runs/compile_cache, which stays between calls).
#
# What comes back (OUT): gpu.txt; bench_{ham,transformer}.{json,log}; profile_{ham,transformer}.{json,log};
# summary.txt (the tables). What to look at:
#   - bench_ham.log table, column ttfs: mbs1 row = cold start (target: the warm one <= 60 s),
#     recipe row = warm start (its "set-up+step" split: the step is 32 micro-batches of real work);
#     the JSON's compile_counters: a warm run should show FX graph cache hits and no misses.
#   - tok/s/GPU and MFU in both modes; the recipe mode is what a 50B-token run gets
#     (targets: MFU >= 40 %, HAM >= 1.3x the Transformer of the same mode).
#   - profile tables: the share of GEMM vs attention/mixer vs norms/elementwise vs host gaps;
#     large host gaps = launch-bound (CUDA graphs), large elementwise = fusion candidates
#     (RMSNorm/SwiGLU/RoPE/CE), cross-entropy at 32k vocab x 16k tokens.
set -u
OUT=${1:?usage: throughput_device.sh OUT_DIR [DEADLINE_S] [STAGES]}
DEADLINE=${2:-540}
STAGES=${3:-"ham_bench ham_profile transformer_profile transformer_bench"}
START=$(date +%s)
CACHE=$PWD/runs/compile_cache  # not CC: an exported CC (the C compiler Triton calls) would be overwritten
mkdir -p "$OUT" "$CACHE"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
echo "compile cache $CACHE at start: $(find "$CACHE" -type f | wc -l) files" >> "$OUT/gpu.txt"
python tools/machine_info.py >> "$OUT/gpu.txt" 2>&1  # the host: a launch-bound step runs at its speed
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)

left() { echo $((DEADLINE - ($(date +%s) - START))); }

stage() {  # stage NAME GPU: run one stage on one GPU under what is left of the deadline
  local name=$1 gpu=$2 t
  t=$(left)
  if [ "$t" -lt 60 ]; then echo "[throughput] $name skipped: ${t}s left" | tee -a "$OUT/summary.txt" >&2; return; fi
  echo "[throughput] $name on GPU $gpu, ${t}s left" >&2
  local arch=${name%%_*} kind=${name#*_}
  local recipe=recipes/${arch}_800m.yaml
  if [ "$kind" = bench ]; then
    CUDA_VISIBLE_DEVICES=$gpu timeout "$t" python tools/bench_recipes.py --recipes "$recipe" --mode both \
      --steps 10 --warmup 3 --recipe-steps 1 --recipe-warmup 1 --timeout "$t" \
      --set "train.compile_cache_dir=$CACHE" --out "$OUT/bench_$arch.json" > "$OUT/bench_$arch.log" 2>&1
  else
    CUDA_VISIBLE_DEVICES=$gpu timeout "$t" python tools/profile_step.py "$recipe" --steps 1 --warmup 1 \
      --set "train.compile_cache_dir=$CACHE" --sync-debug \
      --out "$OUT/profile_$arch.json" > "$OUT/profile_$arch.log" 2>&1
  fi
  echo "[throughput] $name exit $? after $(( $(date +%s) - START ))s" | tee -a "$OUT/summary.txt" >&2
}

chain() {  # chain GPU STAGE...: the stages of one GPU, in order
  local gpu=$1; shift
  for s in "$@"; do stage "$s" "$gpu"; done
}

if [ "$NGPU" -ge 2 ]; then
  chain 0 $(printf '%s\n' $STAGES | grep '^ham_') &
  chain 1 $(printf '%s\n' $STAGES | grep -v '^ham_')
  wait
else
  chain 0 $STAGES
fi
for f in bench_ham bench_transformer profile_ham profile_transformer; do
  [ -f "$OUT/$f.log" ] || continue
  { echo; echo "== $f"; grep -v -e '^{' -e 'Warning' "$OUT/$f.log" | tail -n 14; } >> "$OUT/summary.txt"
done
cat "$OUT/summary.txt"
