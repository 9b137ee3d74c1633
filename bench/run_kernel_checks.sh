#!/bin/bash
# The kernel work's GPU checks in one device call: the Triton tests (-m gpu), then one bench per kernel at
# Llama-3.1-8B shapes. Output goes to stdout and, when $OUT is set, also to $OUT/kernel_checks.txt.
#   bash bench/run_kernel_checks.sh            (from anywhere; runs from the repo root)
#   BENCHES="rms_norm rope" bash bench/run_kernel_checks.sh
set -u -o pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT"; exec > >(tee "$OUT/kernel_checks.txt") 2>&1; fi
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -m gpu tests/kernels -p no:cacheprovider 2>&1 | tail -30 || status=1
for b in ${BENCHES:-rms_norm rope swiglu lora cross_entropy}; do
  timeout "${BENCH_TIMEOUT:-120}" python3 "bench/bench_$b.py" || { echo "bench_$b failed"; status=1; }
done
exit $status
