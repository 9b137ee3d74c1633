#!/bin/bash
# One device call for issue 18's DPO benchmark: the random Llama-3.1-8B-shaped checkpoint, then velotune, TRL's
# DPOTrainer + PEFT and Unsloth's patched DPOTrainer on the same pairs, each run in its own process (separate peaks),
# then $OUT/results.jsonl and the markdown table $OUT/table.md with the velotune / anchor ratios.
# Needs bench/carry/dpo/site.tgz (bash bench/prepare_dpo_wheels.sh, here; carry "bench/carry/dpo").
#   RUNS="velotune:bf16 trl:bf16 velotune:nf4 trl:nf4 unsloth:bf16 unsloth:nf4"   impl:dtype, in this order
#   WARMUP=2 STEPS=5 PAIRS=2 PROMPT=512 COMPLETION=512 PRESET=llama3-8b
#   DEADLINE=420: seconds from the start after which no run starts, and no run outlives it; PER=150 per run
#   CPU check of this script: DEVICE=cpu PRESET=tiny PROMPT=16 COMPLETION=16 PYEXTRA=<dir with httpx> OUT=/tmp/o
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
  UNSLOTH_DISABLE_STATISTICS=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
: >"$OUT/results.jsonl"
: >"$OUT/log.txt"
PRESET=${PRESET:-llama3-8b}
RUNS=${RUNS:-velotune:bf16 trl:bf16 velotune:nf4 trl:nf4 unsloth:bf16 unsloth:nf4}
DEADLINE=${DEADLINE:-420}
SITE=/tmp/dpo_site
DIR=/tmp/m_dpo_$PRESET
SHAPE="--preset $PRESET --pairs ${PAIRS:-2} --prompt_len ${PROMPT:-512} --completion_len ${COMPLETION:-512}"
START=$SECONDS

DEVICE=${DEVICE:-cuda}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"; } |
  tee "$OUT/gpu.txt"
if [ -f bench/carry/dpo/site.tgz ]; then
  mkdir -p $SITE && tar xzf bench/carry/dpo/site.tgz -C $SITE
else
  echo "no bench/carry/dpo/site.tgz: the TRL and Unsloth runs will fail (run bash bench/prepare_dpo_wheels.sh here)"
fi
PYTHONPATH=$SITE/site${PYEXTRA:+:$PYEXTRA} python3 -c "import torch, transformers, peft, trl, datasets, bitsandbytes as b
print('versions: torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__,
      'trl', trl.__version__, 'datasets', datasets.__version__, 'bitsandbytes', b.__version__)" 2>&1 | tail -1 |
  tee -a "$OUT/gpu.txt"

python3 bench/bench_dpo.py make --dir $DIR --preset $PRESET 2>&1 | tail -1
echo "checkpoint ready at $((SECONDS - START))s"

for cfg in $RUNS; do
  IFS=: read -r impl dtype <<<"$cfg"
  left=$((DEADLINE - (SECONDS - START)))
  if ((left < 45)); then
    echo "skip $cfg (time: ${left}s left)"
    continue
  fi
  case $impl in
  velotune) path="" ;;
  trl) path=$SITE/site ;;
  unsloth) path=$SITE/trl115:$SITE/site ;; # Unsloth 2026.10.9 requires trl <= 1.15.0
  esac
  flag=""
  [ "$dtype" = nf4 ] && flag=--nf4
  t=$SECONDS
  PYTHONPATH=$path${PYEXTRA:+:$PYEXTRA} timeout $((left < ${PER:-150} ? left : ${PER:-150})) python3 bench/bench_dpo.py run --impl $impl \
    $flag --dir $DIR $SHAPE --device $DEVICE --warmup ${WARMUP:-2} --steps ${STEPS:-5} --out "$OUT/results.jsonl" \
    >/tmp/dpo_run.txt 2>&1
  rc=$?
  { echo "===== $cfg rc=$rc $((SECONDS - t))s"; cat /tmp/dpo_run.txt; } >>"$OUT/log.txt"
  if grep -q '^RESULT' /tmp/dpo_run.txt; then
    grep -h '^RESULT' /tmp/dpo_run.txt | cut -c8- | python3 -c "import sys, json
for line in sys.stdin:
    r = json.loads(line); r.pop('tb', None); print(json.dumps(r))"
  else # killed by the timeout or crashed before its record: one failure line, so the table shows it
    tail -4 /tmp/dpo_run.txt
    IMPL=$impl DTYPE=$dtype RC=$rc python3 -c "import json, os
print(json.dumps({'impl': os.environ['IMPL'], 'dtype': os.environ['DTYPE'], 'ok': False,
                  'error': 'no result: exit status %s (124: timed out)' % os.environ['RC']}))" >>"$OUT/results.jsonl"
  fi
  echo "$cfg done at $((SECONDS - START))s"
done

{
  echo "# DPO, velotune beside TRL DPOTrainer + PEFT and Unsloth ($PRESET shapes, $(date -u +%F))"
  echo
  echo "$(head -1 "$OUT/gpu.txt"); $(tail -1 "$OUT/gpu.txt")"
  echo
  echo "Command: \`RUNS=\"$RUNS\" WARMUP=${WARMUP:-2} STEPS=${STEPS:-5} bash bench/run_dpo_bench.sh\` (one device call,"
  echo "carry bench/carry/dpo from \`bash bench/prepare_dpo_wheels.sh\`); LoRA r=16 on the 7 projections, beta 0.1,"
  echo "median step of ${STEPS:-5} after ${WARMUP:-2} warm-up, tokens/s over chosen + rejected sequences, peak allocated."
  echo
  python3 bench/bench_dpo.py table --out "$OUT/results.jsonl"
} | tee "$OUT/table.md"
echo "total $((SECONDS - START))s"
