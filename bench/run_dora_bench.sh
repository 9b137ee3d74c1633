#!/bin/bash
# One device call for issue 22's DoRA benchmark: the GPU DoRA tests, the per-projection / MLP DoRA kernel rows of
# bench_lora.py, the random Llama-3.1-8B-shaped checkpoint, then velotune LoRA, velotune DoRA and HF + PEFT DoRA
# training steps (r=16 on the 7 projections, 2 x 2048, bf16 and NF4), each in its own process, and the table
# $OUT/table.md with DoRA's cost over LoRA and velotune DoRA / PEFT DoRA.
# PEFT's NF4 runs need bitsandbytes: bench/carry/anchors.tgz (bash ../shared/bench/prepare_wheels.sh, here) or
# bench/carry/dpo/site.tgz (bash bench/prepare_dpo_wheels.sh); carry "bench/carry". The image has peft.
#   RUNS="velotune:lora:none velotune:dora:none peft:dora:none velotune:lora:nf4 velotune:dora:nf4 peft:dora:nf4"
#   CKPT=1 (recompute, as PEFT's gradient checkpointing; 0 or offload)  BS=2 SEQ=2048 WARMUP=2 STEPS=5
#   KTESTS=1 KBENCH=1 (0 skips the GPU tests / the kernel rows)  DEADLINE=540 s from the start, PER=150 s per run
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
: >"$OUT/results.jsonl"
: >"$OUT/log.txt"
RUNS=${RUNS:-velotune:lora:none velotune:dora:none peft:dora:none velotune:lora:nf4 velotune:dora:nf4 peft:dora:nf4}
DEADLINE=${DEADLINE:-540}
DIR=/tmp/m_dora_${PRESET:-llama3-8b}
START=$SECONDS
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"; } |
  tee "$OUT/gpu.txt"
SITE=""
if [ -f bench/carry/anchors.tgz ]; then
  mkdir -p /tmp/site && tar xzf bench/carry/anchors.tgz -C /tmp/site && SITE=/tmp/site
elif [ -f bench/carry/dpo/site.tgz ]; then
  mkdir -p /tmp/dpo_site && tar xzf bench/carry/dpo/site.tgz -C /tmp/dpo_site && SITE=/tmp/dpo_site/site
else
  echo "no bench/carry/anchors.tgz nor bench/carry/dpo/site.tgz: PEFT's NF4 runs will fail (no bitsandbytes)"
fi
PYTHONPATH=$SITE python3 -c "import torch, transformers, peft
try:
    import bitsandbytes as b; bnb = b.__version__
except ImportError:
    bnb = 'missing'
print('versions: torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__,
      'bitsandbytes', bnb)" 2>&1 | tail -1 | tee -a "$OUT/gpu.txt"

if [ "${KTESTS:-1}" = 1 ]; then
  python3 -m pytest -q -m gpu tests/lora tests/kernels/test_lora.py 2>&1 | tail -5 | tee "$OUT/gpu_tests.txt"
fi
if [ "${KBENCH:-1}" = 1 ]; then
  timeout 150 python3 bench/bench_lora.py 2>&1 | tee "$OUT/bench_lora.txt" | grep -A8 -i "dora\|^lora MLP" | head -80
fi
python3 bench/bench_dora.py make --dir $DIR --preset ${PRESET:-llama3-8b} 2>&1 | tail -1
echo "checkpoint ready at $((SECONDS - START))s"

for cfg in $RUNS; do
  IFS=: read -r impl adapter quant <<<"$cfg"
  left=$((DEADLINE - (SECONDS - START)))
  if ((left < 45)); then
    echo "skip $cfg (time: ${left}s left)"
    continue
  fi
  path=""
  [ "$impl" = peft ] && path=$SITE
  flag=""
  [ "$adapter" = dora ] && flag=--dora
  t=$SECONDS
  PYTHONPATH=$path timeout $((left < ${PER:-150} ? left : ${PER:-150})) python3 bench/bench_dora.py run --impl $impl \
    $flag --dir $DIR --quant $quant --bs ${BS:-2} --seq ${SEQ:-2048} --ckpt ${CKPT:-1} --warmup ${WARMUP:-2} \
    --steps ${STEPS:-5} >/tmp/dora_run.txt 2>&1
  rc=$?
  { echo "===== $cfg rc=$rc $((SECONDS - t))s"; cat /tmp/dora_run.txt; } >>"$OUT/log.txt"
  if grep -q '^RESULT' /tmp/dora_run.txt; then
    grep -h '^RESULT' /tmp/dora_run.txt | cut -c8- | python3 -c "import sys, json
for line in sys.stdin:
    r = json.loads(line); r.pop('tb', None); print(json.dumps(r))" | tee -a "$OUT/results.jsonl"
  else # killed by the timeout or crashed before its record: one failure line, so the table shows it
    tail -4 /tmp/dora_run.txt
    IMPL=$impl ADAPTER=$adapter QUANT=$quant RC=$rc python3 -c "import json, os
print(json.dumps({'impl': os.environ['IMPL'], 'adapter': os.environ['ADAPTER'], 'quant': os.environ['QUANT'],
                  'bs': 0, 'seq': 0, 'ok': False, 'error': 'no result: exit status %s (124: timed out)' % os.environ['RC']}))" \
      >>"$OUT/results.jsonl"
  fi
  echo "$cfg done at $((SECONDS - START))s"
done

{
  echo "# DoRA: velotune LoRA, velotune DoRA, HF + PEFT DoRA (${PRESET:-llama3-8b} shapes, $(date -u +%F))"
  echo
  echo "$(head -1 "$OUT/gpu.txt"); $(tail -1 "$OUT/gpu.txt")"
  echo
  echo "Command: \`RUNS=\"$RUNS\" CKPT=${CKPT:-1} bash bench/run_dora_bench.sh\` (one device call, carry bench/carry);"
  echo "r=16, alpha=16 on the 7 projections, ${BS:-2} x ${SEQ:-2048} random tokens, median step of ${STEPS:-5} after"
  echo "${WARMUP:-2} warm-up, peak allocated after the optimizer exists."
  echo
  python3 bench/bench_dora.py table "$OUT/results.jsonl"
} | tee "$OUT/table.md"
echo "total $((SECONDS - START))s"
