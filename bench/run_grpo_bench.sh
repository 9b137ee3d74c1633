#!/bin/bash
# One device call for the GRPO benchmark: the random Llama-3.1-8B-shaped checkpoint (bench_dpo.py make), then
# velotune's Trainer + GRPO objective and TRL's GRPOTrainer + PEFT (transformers generation, no vLLM) on the same
# prompts, each run in its own process (separate peaks) with its own time limit, then $OUT/results.jsonl and the
# markdown table $OUT/table.md with the velotune / TRL ratios.
# Needs bench/carry/dpo/site.tgz for TRL (bash bench/prepare_dpo_wheels.sh, here; carry "bench/carry/dpo").
#   RUNS="velotune:1024 trl:1024 velotune:4096 trl:4096"   impl:completion length, in this order; velotune:longest
#        tries 8192,16384,20480,32768 (LENGTHS) and reports the longest that fits (a call of its own: ~5 min)
#   DTYPE=nf4 (or bf16)  PROMPTS=1  PROMPT=256  MICRO_BATCH=8  PRESET=llama3-8b
#   STEPS: steps per run, the first a warm-up (default 2 up to 1,024 tokens: 1 timed; 1 beyond: the warm-up step
#        alone, marked in the table); generation decodes one token per step of the group, so a step at 4,096 tokens
#        takes minutes
#   DEADLINE=510: seconds from the start after which no run starts and none outlives it; each run may use what is
#        left minus MIN=60 s for each run after it; a run at its limit still writes its record ({"timeout": true},
#        the steps done, where generation was)
#   CPU check of this script: DEVICE=cpu PRESET=tiny PROMPT=16 RUNS="velotune:32 trl:32" PYEXTRA=<dir> OUT=/tmp/o
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
: >"$OUT/results.jsonl"
: >"$OUT/log.txt"
PRESET=${PRESET:-llama3-8b}
RUNS=${RUNS:-velotune:1024 trl:1024 velotune:4096 trl:4096}
DTYPE=${DTYPE:-nf4}
DEADLINE=${DEADLINE:-510}
MIN=${MIN:-60}
SITE=/tmp/dpo_site
DIR=/tmp/m_dpo_$PRESET
DEVICE=${DEVICE:-cuda}
SHAPE="--preset $PRESET --prompts ${PROMPTS:-1} --prompt_len ${PROMPT:-256}"
[ "$DTYPE" = bf16 ] && SHAPE="$SHAPE --bf16"
START=$SECONDS

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"; } |
  tee "$OUT/gpu.txt"
if [ -f bench/carry/dpo/site.tgz ]; then
  mkdir -p $SITE && tar xzf bench/carry/dpo/site.tgz -C $SITE
else
  echo "no bench/carry/dpo/site.tgz: the TRL runs will fail (run bash bench/prepare_dpo_wheels.sh here)"
fi
PYTHONPATH=$SITE/site${PYEXTRA:+:$PYEXTRA} python3 -c "import torch, transformers, peft, trl, datasets, bitsandbytes as b
print('versions: torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__,
      'trl', trl.__version__, 'datasets', datasets.__version__, 'bitsandbytes', b.__version__)" 2>&1 | tail -1 |
  tee -a "$OUT/gpu.txt"

python3 bench/bench_dpo.py make --dir $DIR --preset $PRESET 2>&1 | tail -1
echo "checkpoint ready at $((SECONDS - START))s"

fail_line() { # a run skipped, or killed before its record: one failure line, so the table shows it
  IMPL=$1 LEN=$2 WHY=$3 DTYPE=$DTYPE python3 -c "import json, os
length = os.environ['LEN']
print(json.dumps({'impl': os.environ['IMPL'], 'dtype': os.environ['DTYPE'], 'ok': False,
                  'longest': length == 'longest', 'completion_len': None if length == 'longest' else int(length),
                  'error': os.environ['WHY']}))" >>"$OUT/results.jsonl"
}

set -- $RUNS
while (($# > 0)); do
  cfg=$1
  shift
  IFS=: read -r impl len <<<"$cfg"
  left=$((DEADLINE - (SECONDS - START)))
  limit=$((left - MIN * $#))
  if ((limit < 45)); then
    echo "skip $cfg (time: ${left}s left, ${limit}s for this run)"
    fail_line "$impl" "$len" "not run: ${left}s of the call left"
    continue
  fi
  path=""
  [ "$impl" = trl ] && path=$SITE/site
  if [ "$len" = longest ]; then
    what="--longest --lengths ${LENGTHS:-8192,16384,20480,32768}"
  else
    steps=${STEPS:-$((len <= 1024 ? 2 : 1))}
    what="--completion $len --steps $steps --micro_batch ${MICRO_BATCH:-8}"
  fi
  t=$SECONDS
  echo "$cfg: up to ${limit}s"
  PYTHONPATH=$path${PYEXTRA:+:$PYEXTRA} timeout -s KILL $((limit + 15)) python3 bench/bench_grpo.py run --impl $impl \
    --dir $DIR $SHAPE $what --device $DEVICE --time_limit $((limit - 5)) --out "$OUT/results.jsonl" \
    >/tmp/grpo_run.txt 2>&1
  rc=$?
  { echo "===== $cfg rc=$rc $((SECONDS - t))s"; cat /tmp/grpo_run.txt; } >>"$OUT/log.txt"
  if grep -q '^RESULT' /tmp/grpo_run.txt; then
    grep -h '^RESULT' /tmp/grpo_run.txt | cut -c8- | python3 -c "import sys, json
for line in sys.stdin:
    r = json.loads(line); r.pop('tb', None); print(json.dumps(r))"
  else
    tail -4 /tmp/grpo_run.txt
    fail_line "$impl" "$len" "no result: exit status $rc (137: killed at the time limit)"
  fi
  echo "$cfg done at $((SECONDS - START))s"
done

{
  echo "# GRPO, velotune beside TRL GRPOTrainer + PEFT ($PRESET shapes, $DTYPE, $(date -u +%F))"
  echo
  echo "$(head -1 "$OUT/gpu.txt"); $(tail -1 "$OUT/gpu.txt")"
  echo
  echo "Command: \`RUNS=\"$RUNS\" DTYPE=$DTYPE STEPS=${STEPS:-auto} bash bench/run_grpo_bench.sh\` (one device call, carry"
  echo "bench/carry/dpo from \`bash bench/prepare_dpo_wheels.sh\`); ${PROMPTS:-1} prompt(s) of ${PROMPT:-256} tokens x 8"
  echo "completions per step, run to the full completion length (EOS ignored), beta 0, loss dapo, LoRA r=16 alpha 32 on"
  echo "the 7 projections, gradient checkpointing, micro-batch ${MICRO_BATCH:-8}; median of the steps after the first"
  echo "(warm-up), generation = sampling + rewards, training = the rest of the step; peak allocated from just before"
  echo "training. TRL generates with transformers' generate (no vLLM)."
  echo
  python3 bench/bench_grpo.py table --out "$OUT/results.jsonl"
} | tee "$OUT/table.md"
echo "total $((SECONDS - START))s"
