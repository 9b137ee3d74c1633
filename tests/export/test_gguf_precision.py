"""export_gguf_files rounds each weight once, from the model's own precision to the file's type.

The merged model used to be written in bfloat16 on its way to GGUF, so an f16 file of an fp32 model held every
weight rounded twice (relative logit error 0.0027 instead of ~0.0005). Here every tensor read back with gguf-py's
reader must equal the source weight (q/k rows in llama.cpp's order) quantized once by gguf-py itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf.quants import quantize as gguf_quantize

from velotune.export.pipeline import export_gguf_files, intermediate_dtype
from velotune.models.load import load_model

from .conftest import save_llama
from .test_gguf import gguf_name, llama_cpp_rows


@pytest.fixture(scope="module")
def fp32_dir(tmp_path_factory: pytest.TempPathFactory, small_bpe_tokenizer_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("fp32_llama")
    save_llama(out, small_bpe_tokenizer_dir, vocab_size=512)
    return out


def source_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def assert_rounded_once(path: Path, weights: dict[str, torch.Tensor], n_head: int = 4, n_head_kv: int = 2) -> None:
    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
    assert len(tensors) == len(weights)
    for hf_name, w in weights.items():
        if "q_proj" in hf_name or "k_proj" in hf_name:
            w = llama_cpp_rows(w, n_head if "q_proj" in hf_name else n_head_kv)
        t = tensors[gguf_name(hf_name)]
        expected = gguf_quantize(w.float().numpy(), t.tensor_type)
        assert np.array_equal(np.asarray(t.data).reshape(expected.shape), expected), f"{hf_name} ({t.tensor_type.name})"


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_fp32_model_is_rounded_once_to_the_file_type(fp32_dir, tmp_path, quant):
    model, tok = load_model(fp32_dir, torch.float32)
    (path,) = export_gguf_files(model, tok, tmp_path, [quant], progress=False)
    weights = source_weights(fp32_dir)
    assert_rounded_once(path, weights)
    if quant == "f16":  # through bf16 the values differ: the check above would catch the old path
        w = weights["model.layers.0.mlp.up_proj.weight"]
        assert not torch.equal(w.bfloat16().half(), w.half())
        types = {t.tensor_type for t in GGUFReader(str(path)).tensors}
        assert types == {T.F16, T.F32}  # 2-D weights f16, norms f32 (exact)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_model_reaches_f16_without_a_detour(fp32_dir, tmp_path, dtype):
    """An fp16 model's f16 file holds its very weights; a bf16 model's holds them cast once (exact in f16 here)."""
    model, tok = load_model(fp32_dir, dtype)
    (path,) = export_gguf_files(model, tok, tmp_path, ["f16"], progress=False)
    assert_rounded_once(path, {k: v.to(dtype) for k, v in source_weights(fp32_dir).items()})


def test_intermediate_dtype_is_the_models_own(fp32_dir):
    model, _ = load_model(fp32_dir, torch.float32, with_tokenizer=False)
    assert intermediate_dtype(model) == torch.float32
    for dtype in (torch.float16, torch.bfloat16):
        assert intermediate_dtype(model.to(dtype)) == dtype
    model.lm_head.to(torch.float16)  # mixed 16-bit types: float32 holds both exactly
    assert intermediate_dtype(model) == torch.float32
