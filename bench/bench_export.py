"""GGUF export throughput: seconds per GB of bf16 weights for each quant type, on a synthetic Llama checkpoint.

    python bench/bench_export.py                      # ~0.5 GB checkpoint, all quant types, all cores
    python bench/bench_export.py --gb 2 --quants q4_k_m --workers 16

The checkpoint is written the way velotune writes merged models (bf16 safetensors, sharded, tokenizer.json) with
random N(0, 0.02) weights, so k-quant searches see weight-like data. Seconds per GB scale to a real model: an 8B
Llama is ~16 GB of bf16, so its export takes about 16 x (s/GB) on the same number of cores. CPU seconds per GB
(this process plus its worker processes) are printed too: on a shared machine they are the steadier number, and
divided by the core count they estimate the wall time on a bigger box.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from velotune.export.gguf import QUANT_TYPES, export_gguf


def _tokenizer(out: Path) -> None:
    """A small byte-level BPE tokenizer; the config's larger vocab_size is padded with unused tokens on export."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 8, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(out)


def build_checkpoint(out: Path, gb: float, hidden: int, seed: int = 0) -> int:
    """A Llama checkpoint of about `gb` GB in bf16 (GQA 4:1, ffn 4 x hidden, vocab 32000); returns its parameters."""
    n_head, vocab, ffn = hidden // 128, 32000, 4 * hidden
    kv = max(1, n_head // 4) * 128
    per_layer = 2 * hidden * hidden + 2 * kv * hidden + 3 * ffn * hidden + 2 * hidden
    layers = max(1, round((gb * 1e9 / 2 - 2 * vocab * hidden) / per_layer))
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": kv // 128,
        "head_dim": 128,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    _tokenizer(out)
    gen = torch.Generator().manual_seed(seed)

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    shards: list[dict[str, torch.Tensor]] = [{"model.embed_tokens.weight": w(vocab, hidden)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        shards.append(
            {
                p + "self_attn.q_proj.weight": w(hidden, hidden),
                p + "self_attn.k_proj.weight": w(kv, hidden),
                p + "self_attn.v_proj.weight": w(kv, hidden),
                p + "self_attn.o_proj.weight": w(hidden, hidden),
                p + "mlp.gate_proj.weight": w(ffn, hidden),
                p + "mlp.up_proj.weight": w(ffn, hidden),
                p + "mlp.down_proj.weight": w(hidden, ffn),
                p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            }
        )
    shards.append({"model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16), "lm_head.weight": w(vocab, hidden)})
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(t.numel() for s in shards for t in s.values())


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the worker pools), robust to a busy machine."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", type=float, default=0.5, help="checkpoint size in GB of bf16 weights")
    ap.add_argument("--hidden", type=int, default=1024, help="hidden size (a multiple of 256 keeps k-quant blocks)")
    ap.add_argument("--quants", nargs="+", default=list(QUANT_TYPES), choices=QUANT_TYPES)
    ap.add_argument("--workers", type=int, default=None, help="quantizing processes (default: all cores)")
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temporary one)")
    args = ap.parse_args()
    cores = args.workers or len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        model_dir = Path(tmp) / "model"
        n = build_checkpoint(model_dir, args.gb, args.hidden)
        gb = 2 * n / 1e9
        print(f"checkpoint: {n / 1e6:.0f}M parameters, {gb:.2f} GB bf16, {cores} worker processes")
        print(f"{'quant':8s} {'wall s':>7s} {'wall s/GB':>9s} {'cpu s/GB':>9s} {'out MB':>7s}  8B (16 GB) on 16 cores")
        for quant in args.quants:
            out = Path(tmp) / f"model-{quant}.gguf"
            start, cpu0 = time.perf_counter(), _cpu_seconds()
            export_gguf(model_dir, out, quant, progress=False, workers=cores)
            dt, cpu = time.perf_counter() - start, _cpu_seconds() - cpu0
            est = 16 * cpu / gb / 16 / 60  # CPU time spread over 16 cores; disk and spawn overhead not included
            size = out.stat().st_size / 1e6
            print(f"{quant:8s} {dt:7.1f} {dt / gb:9.1f} {cpu / gb:9.1f} {size:7.0f}  ~{est:.1f} min")
            out.unlink()


if __name__ == "__main__":
    main()
