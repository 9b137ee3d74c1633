"""From a trained model to files people run: merge LoRA, write the 16-bit HF layout, then GGUF + Modelfile."""

from __future__ import annotations

import copy
import re
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

# A GGUF type at the end of a file stem (Model.Q4_1, model-q4_k_m, Model.BF16, model-IQ3_XXS)
_QUANT_SUFFIX = re.compile(r"[.-](?:f16|f32|bf16|i?q\d(?:_[a-z0-9]+)*)$", re.IGNORECASE)


def gguf_stem(source: str | Path | None) -> str:
    """The name exported GGUF files start with: the model's file or directory name, without `.gguf` and without the
    quant type a GGUF source carries (SmolLM2-135M-Instruct.Q4_1.gguf -> SmolLM2-135M-Instruct), so the files of
    each export name one type."""
    name = Path(source or "model").name.removesuffix(".gguf")
    return _QUANT_SUFFIX.sub("", name) or "model"


def merged_copy(model: CausalLM) -> CausalLM:
    """The model with LoRA merged into its weights; the original keeps its adapter."""
    return merge_lora(copy.deepcopy(model)) if model.lora_config is not None else model


_GGUF_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what export_gguf reads from safetensors


def intermediate_dtype(model: CausalLM) -> torch.dtype:
    """The dtype the merged model is saved in on its way to GGUF: its own weights' dtype, so each weight is rounded
    once, to the file's type (an fp32 model through bf16 to f16 lost precision twice); float32 when 16-bit types are
    mixed or the dtype is one the GGUF writer does not read."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) == 1 and dtypes <= set(_GGUF_INPUT_DTYPES):
        return dtypes.pop()
    return torch.float32


def export_gguf_files(
    model: CausalLM, tokenizer: Any, out_dir: str | Path, quants: list[str], progress: bool = True
) -> list[Path]:
    """GGUF files (one per quant type) and an Ollama Modelfile for the first, in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = gguf_stem(model.source)
    merged = merged_copy(model)
    with tempfile.TemporaryDirectory(dir=out, prefix=".hf-") as tmp:
        save_hf(merged, tokenizer, Path(tmp) / "hf", dtype=intermediate_dtype(merged))
        del merged  # the LoRA-merged copy: free it before converting
        paths = [export_gguf(Path(tmp) / "hf", out / f"{stem}-{q}.gguf", q, progress=progress) for q in quants]
    vocab = tokenizer.get_vocab()
    stops = [t for t in END_OF_TURN_TOKENS if t in vocab]
    write_modelfile(paths[0], getattr(tokenizer, "chat_template", None), stops)
    return paths
