#!/bin/bash
# One device call: kernel tests, the 8B-shaped random checkpoint, velotune and the anchors on the same batches,
# then the ratio table. Needs bench/carry/ (anchors.tgz + anchor_bench.py, see ../shared/bench/README.md).
#   VT="none:2:2048:offload nf4:2:2048:offload"  velotune configs (quant:bs:seq:ckpt[:fraction of layers ckpt]);
#     quant: none | nf4 | fp8 (FP8 base weights, load_in_fp8; compared with the 16-bit anchors and velotune none)
#   ANCHORS="hf:none:2:2048 unsloth:none:2:2048"  anchor configs (impl:quant:bs:seq); empty skips them
#   KTESTS=1 runs the GPU kernel tests first; PRESET=llama3-8b
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; : > "$OUT/results.jsonl"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
date -u +%F | tee -a "$OUT/gpu.txt"
if [ -f bench/carry/anchors.tgz ]; then mkdir -p /tmp/site && tar xzf bench/carry/anchors.tgz -C /tmp/site; fi
[ "${KTESTS:-0}" = 1 ] && { python3 -m pytest -q -m gpu tests/kernels tests/quant tests/models/test_checkpointing.py 2>&1 | tail -15 | tee "$OUT/kernel_tests.txt"; }
START=$SECONDS
DIR=/tmp/m_${PRESET:-llama3-8b}
[ -d $DIR ] || PYTHONPATH=/tmp/site python3 bench/carry/anchor_bench.py make --dir $DIR --preset ${PRESET:-llama3-8b} 2>&1 | tail -1
echo "checkpoint ready at $((SECONDS-START))s"
for cfg in ${VT:-"none:2:2048:offload"}; do
  IFS=: read quant bs seq ckpt frac <<<"$cfg"
  timeout ${PER:-150} python3 bench/bench_train.py --dir $DIR --quant $quant --bs $bs --seq $seq --ckpt $ckpt \
    --ckpt_layers ${frac:-1} ${PROFILE:+--profile} \
    > /tmp/vt.txt 2>&1; cp /tmp/vt.txt "$OUT/vt_${quant}_${bs}x${seq}_${ckpt}.txt"; grep -v '^RESULT' /tmp/vt.txt | tail -${TAILN:-3}
  grep -h '^RESULT' /tmp/vt.txt | cut -c8- | tee -a "$OUT/results.jsonl"
done
for cfg in ${ANCHORS-"hf:none:2:2048 unsloth:none:2:2048"}; do
  IFS=: read impl quant bs seq <<<"$cfg"
  if (( SECONDS - START > ${BUDGET:-480} )); then echo "skip $cfg (time)"; continue; fi
  PYTHONPATH=/tmp/site timeout ${PER:-150} python3 bench/carry/anchor_bench.py run --dir $DIR --impl $impl --quant $quant \
    --bs $bs --seq $seq > /tmp/an.txt 2>&1
  grep -h '^RESULT' /tmp/an.txt | cut -c8- | python3 -c "import sys,json
for l in sys.stdin:
  r=json.loads(l); r.pop('tb',None); print(json.dumps(r))" | tee -a "$OUT/results.jsonl"
  grep -q '^RESULT' /tmp/an.txt || tail -3 /tmp/an.txt
done
[ -n "${EXPORT_GB:-}" ] && python3 bench/bench_export.py --gb $EXPORT_GB --hidden 4096 --quants ${EXPORT_QUANTS:-f16 q8_0 q4_k_m} 2>&1 | grep -v "it/s" | tail -12 | tee "$OUT/export_bench.txt"
python3 bench/bench_train.py table "$OUT/results.jsonl" | tee "$OUT/table.md"
echo "total $((SECONDS-START))s"
