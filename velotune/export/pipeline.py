"""From a trained model to files people run: merge LoRA, write the 16-bit HF layout, then GGUF + Modelfile."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import torch

from velotune.export.gguf import export_gguf
from velotune.export.hf import save_hf
from velotune.export.modelfile import write_modelfile
from velotune.lora.apply import merge_lora
from velotune.models.decoder import CausalLM
from velotune.models.generate import END_OF_TURN_TOKENS


def merged_copy(model: CausalLM) -> CausalLM:
    """The model with LoRA merged into its weights; the original keeps its adapter."""
    return merge_lora(copy.deepcopy(model)) if hasattr(model, "lora_config") else model


def export_gguf_files(
    model: CausalLM, tokenizer: Any, out_dir: str | Path, quants: list[str], progress: bool = True
) -> list[Path]:
    """GGUF files (one per quant type) and an Ollama Modelfile for the first, in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(getattr(model, "source", "model") or "model").name.removesuffix(".gguf")
    with tempfile.TemporaryDirectory(dir=out, prefix=".hf-") as tmp:
        save_hf(merged_copy(model), tokenizer, Path(tmp) / "hf", dtype=torch.bfloat16)
        paths = [export_gguf(Path(tmp) / "hf", out / f"{stem}-{q}.gguf", q, progress=progress) for q in quants]
    vocab = tokenizer.get_vocab()
    stops = [t for t in END_OF_TURN_TOKENS if t in vocab]
    write_modelfile(paths[0], getattr(tokenizer, "chat_template", None), stops)
    return paths
