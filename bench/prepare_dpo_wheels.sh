#!/bin/bash
# Builds bench/carry/dpo/site.tgz for bench/run_dpo_bench.sh: what the GPU machine lacks for the DPO anchors
# (TRL, datasets, bitsandbytes, Unsloth and their needs), unpacked for Python 3.12 / x86-64 / CUDA 13 and trimmed
# to fit a GPU call's 64 MiB carry limit. The machine already has torch, transformers, peft, accelerate, pyarrow,
# pandas, xxhash and triton (/work/.library/device/KINDS.md), so those are not carried.
#
#   site/    TRL 1.16 (the TRL anchor), datasets 4.8.5 (TRL 1.16 needs >= 4.7, Unsloth < 5), bitsandbytes, Unsloth
#   trl115/  TRL 1.15 alone, put before site/ for the Unsloth runs (Unsloth 2026.10.9 requires trl <= 1.15.0)
#
# Run once from the project root (needs the package index):  bash bench/prepare_dpo_wheels.sh
set -euo pipefail
out=${1:-bench/carry/dpo}
w=$(mktemp -d)
s=$(mktemp -d)
P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp"
for p in manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  P="$P --platform ${p}_x86_64"
done
python3 -m pip download -q $P -d "$w/site" trl==1.16.0 datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19 \
  bitsandbytes==0.50.2 unsloth==2026.10.9 unsloth-zoo==2026.10.9 cut_cross_entropy tyro docstring-parser typeguard \
  shtab msgspec torchao structlog json5 nest-asyncio hf_transfer pydantic pydantic-core annotated-types \
  typing-inspection
python3 -m pip download -q $P -d "$w/trl115" trl==1.15.0
for part in site trl115; do
  for f in "$w/$part"/*.whl; do unzip -q -o "$f" -d "$s/$part"; done
done
rm -rf "$s/site/studio" "$s/site/test"
find "$s/site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*cuda130*' ! -name '*cpu*' -delete
mkdir -p "$out"
tar czf "$out/site.tgz" -C "$s" site trl115
ls -la "$out/site.tgz"
rm -rf "$w" "$s"
