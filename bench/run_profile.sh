#!/bin/bash
# One device call: make the preset's random checkpoint (if missing) and profile one velotune LoRA step on it,
# printing the GPU busy/idle report; the chrome trace goes to $OUT/trace_<preset>_<quant>.json.gz.
#   PRESET=llama3-8b QUANT=none CKPT=offload bash bench/run_profile.sh
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
P=${PRESET:-llama3-8b}; DIR=/tmp/m_$P
[ -d $DIR ] || python3 bench/carry/anchor_bench.py make --dir $DIR --preset $P 2>&1 | tail -1
timeout ${PER:-240} python3 bench/profile_step.py --dir $DIR --quant ${QUANT:-none} --ckpt ${CKPT:-offload} \
  --trace "$OUT/trace_${P}_${QUANT:-none}.json.gz" 2>&1 | grep -v Warning | tail -${TAILN:-70}
