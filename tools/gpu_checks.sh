#!/usr/bin/env bash
# The GPU checks to run on the device after a change to GPU code or to checkpointing, in one call,
# from the repo root with the package bundle on PYTHONPATH (CONTRIBUTING.md "On the GPU machine"):
#
#   mkdir -p /tmp/site && tar -xJf .gpu/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD || exit;
#   bash tools/gpu_checks.sh $OUT                 # everything below
#   bash tools/gpu_checks.sh $OUT "short_conv"    # the kernel tests matching a pytest -k expression
#   bash tools/gpu_checks.sh $OUT "" kernels      # only the kernel tests (all but flex at 16k), in
#                                                 # their own call: after the model tests they do
#                                                 # not fit one call (2026-12-03 21:54, below)
#
# The two parts run at the same time (correctness only, nothing here is timed; 16 CPU cores compile for both):
# 1. tests/test_kernels_gpu.py (kernels vs their CPU references), SDPA's per-document windows
#    at 16k with every backend vs the block-diagonal mask, the GDN mixer on its GPU
#    kernels vs the fp32 mixer, gradient accumulation fusion vs DDP's unfused main_grad and a model
#    with the fusions on (our pre-norm kernels, liger-kernel's SwiGLU) vs off
#    (tests/test_parallel.py, one process each); cut at 480 s                          -> OUT/gpu_tests.log
#    Without the FlexAttention fallback's T = 16384 cases (impl="flex", not what "auto" runs):
#    each compiles for minutes, and the 2026-12-03 06:26 run spent the whole limit in them. Run
#    them alone after a change to kernels/scratchpad.py: pytest tests/test_kernels_gpu.py -k flex
#    (at 06:44 the rest took more than 320 s: the limit is 480 s, with the smoke run alongside)
# 2. a bf16 learned-router HAM through ham-train on the GPU (distributed optimizer, a checkpoint
#    every 10 steps; the KV-fraction controllers update on the device after every step), resumed
#    to step 30, then ham-eval on the checkpoint                                        -> OUT/smoke.log, OUT/eval.json
#    (the bf16 learned-router save crashed in megatron-core 0.19.2 before the router held the
#    model's dtype; ham-eval on a GPU-trained checkpoint)
# (06:53 run: with the tests compiling alongside, the first step took 53 s; the limits of 140 s
# and 70 s cut both runs. 2026-12-03 11:25 run: the cold first step took 170 s, train and resume
# passed, ham-eval was cut at 60 s (now 130 s); 40 kernel tests passed, 2 skipped, and the two
# test_parallel ones, then last, did not start within 480 s: they now run first, and -v names
# every test in the log. 2026-12-03 14:10 run with a K: the cold first step took 167 s, train,
# resume and ham-eval (85 s) passed; the K also deselected the test_parallel checks, so they now
# run in their own pytest before the kernel tests)
# Each part has its own limit (<= 480 s in all: one device call of 600 s); what finished is under OUT. Exit status: the number of failed parts.
# (2026-12-03 21:54 run: the four model-level tests took 215 s with fla's TileLang kernels
# compiled cold; of the kernel tests after them 2 ran before the 480 s limit: run those with
# PART=kernels in a call of their own)
set -u
OUT=${1:?usage: gpu_checks.sh OUT_DIR [PYTEST_K] [all|kernels]}
K=${2:-not (flex and 16384)}  # also when given as "" (PART after it)
PART=${3:-all}
case "$PART" in all|kernels) ;; *) echo "gpu_checks.sh: PART must be all or kernels, got '$PART'" >&2; exit 2;; esac
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True NCCL_NVLS_ENABLE=0 \
  TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python -c "import torch, triton; print(torch.__version__, triton.__version__)" >> "$OUT/gpu.txt" 2>&1
failed=0
if [ "$PART" = kernels ]; then
  timeout 560 python -m pytest tests/test_kernels_gpu.py -k "$K" -v -rs --timeout=300 --durations=10 \
    > "$OUT/gpu_tests.log" 2>&1 || failed=1
  tail -3 "$OUT/gpu_tests.log"
  exit $failed
fi
# the three test_parallel checks, then the kernel tests that match K (a -k over both invocations
# deselected the test_parallel ones on 2026-12-03 14:10)
timeout 480 bash -c 'python -m pytest tests/test_parallel.py::test_gdn_mixer_gpu_kernels_match_reference_ops \
    tests/test_parallel.py::test_gradient_accumulation_fusion_gives_the_unfused_main_grad \
    tests/test_parallel.py::test_pre_norm_kernel_and_liger_swiglu_in_the_model \
    tests/test_sdpa_documents.py::test_sdpa_documents_flash_equals_mask_on_gpu -v -rs --timeout=200
  r=$?; python -m pytest tests/test_kernels_gpu.py -k "$0" -v -rs --timeout=300 --durations=10 || r=1; exit $r' "$K" \
  > "$OUT/gpu_tests.log" 2>&1 &
PARITY=$!
W=$(mktemp -d /tmp/gpu_checks.XXXXXX)
C="recipes/evidence/ham_learned_f25.yaml data.backend=synthetic data.loss_mask=all checkpoint.dir=$W/ckpt checkpoint.interval=10
   train.eval_interval=0 logging.interval=5 train.warmup_steps=2 train.compile_cache_dir=$W/cc"
{
  date +%T; timeout 220 torchrun --standalone --nproc-per-node 1 -m megatron_ham.train $C train.train_steps=20
  echo "rc_train=$?"; date +%T
  timeout 120 torchrun --standalone --nproc-per-node 1 -m megatron_ham.train $C train.train_steps=30
  echo "rc_resume=$?"; date +%T
  timeout 130 python -m megatron_ham.eval --checkpoint "$W/ckpt" --tasks mqar,routing --lengths 1k,2k \
    --samples 8 --no-plots --no-progress --out "$OUT/eval.json"
  echo "rc_eval=$?"; date +%T
  ls "$W/ckpt"
} > "$OUT/smoke.log" 2>&1
wait $PARITY || failed=$((failed + 1))
grep -q "rc_train=0" "$OUT/smoke.log" && grep -q "rc_resume=0" "$OUT/smoke.log" \
  && grep -q "rc_eval=0" "$OUT/smoke.log" || failed=$((failed + 1))
tail -3 "$OUT/gpu_tests.log"; grep -E "^rc_|saved step|resumed from" "$OUT/smoke.log"
exit $failed
