#!/bin/bash
# One device call for issue 19's generation table: the NF4 GEMV's GPU tests, its tile sweep on Llama-3.1-8B's
# projection shapes (bench/decode_check.py), then bench_generate for bf16 (velotune and transformers at batch 1, 16,
# 64, 256) and NF4 (velotune at all four, transformers + bitsandbytes at HF_NF4_BATCHES) into $OUT/results.jsonl
# and $OUT/table.md; ~9 min on an H200. Carry bench/carry/dpo (bash bench/prepare_dpo_wheels.sh) for bitsandbytes.
# STEPS=1 adds decode_check's per-step split (loop vs graph replay).
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
SITE=/tmp/dpo_site  # bitsandbytes for transformers' NF4 rows (bench/carry/dpo/site.tgz, carry "bench/carry/dpo")
[ -f bench/carry/dpo/site.tgz ] && mkdir -p $SITE && tar xzf bench/carry/dpo/site.tgz -C $SITE
python3 -m pytest -q -m gpu tests/kernels/test_nf4_matmul.py tests/kernels/test_attention.py \
  -k "nf4 or decode or fused or linear4bit" 2>&1 | tail -4
SKIP=--skip_steps
[ -n "${STEPS:-}" ] && SKIP=""
python3 bench/decode_check.py --out "$OUT/kernels.jsonl" $SKIP 2>&1 |
  grep RESULT | cut -c8- | python3 -c "import sys, json
for l in sys.stdin:
    r = json.loads(l); print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})"
python3 bench/bench_generate.py --dtypes bf16 --impls velotune,hf --batches 1,16,64,256 --deadline 270 \
  --out "$OUT/results.jsonl" 2>&1 | grep -v Warning | tail -3
python3 bench/bench_generate.py --dtypes nf4 --impls velotune --batches 1,16,64,256 --deadline 150 \
  --out "$OUT/results.jsonl" 2>&1 | grep -v Warning | tail -3
PYTHONPATH=$SITE/site python3 bench/bench_generate.py --dtypes nf4 --impls hf --batches ${HF_NF4_BATCHES:-1,64} --deadline 150 \
  --out "$OUT/results.jsonl" 2>&1 | grep -v Warning | tail -3
python3 bench/bench_generate.py table "$OUT/results.jsonl" | tee "$OUT/table.md"
