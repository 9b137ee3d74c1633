"""Our GGUF files in llama.cpp itself (pip install llama-cpp-python; run with -m llamacpp).

llama.cpp is the consumer the format is for: it must load every export, compute the original model's logits, and
its own llama-quantize, given our bf16 file, must choose the same type for every tensor and (float summation order
aside) the same blocks as our direct k-quant export from the same bf16 weights.
"""

from __future__ import annotations

import copy
import ctypes
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGUFReader
from gguf import GGMLQuantizationType as T

from velotune.export.gguf import export_gguf

try:
    import llama_cpp
except ImportError:  # skip at run time, not at collection: deselected by default, so no skip is reported
    llama_cpp = None
pytestmark = [pytest.mark.llamacpp, pytest.mark.skipif(llama_cpp is None, reason="pip install llama-cpp-python")]

IDS = [1, 100, 200, 3000, 45000, 7, 999, 12345]
FTYPE = {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18, "q8_0": 7}  # llama_ftype values


def llama_cpp_logits(path: Path) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, verbose=False, n_ctx=64, n_threads=2)
    llm.eval(IDS)
    return np.array(llm.scores[: len(IDS)])


@pytest.mark.parametrize(("quant", "tolerance"), [("f16", 2e-3), ("q8_0", 5e-2), ("q4_k_m", 0.3), ("q6_k", 0.1)])
def test_llama_cpp_computes_the_original_logits(kquant_llama, tmp_path, quant, tolerance):
    model, model_dir = kquant_llama
    with torch.no_grad():
        ref = model(torch.tensor([IDS])).logits[0].numpy()
    got = llama_cpp_logits(export_gguf(model_dir, tmp_path / "m.gguf", quant, progress=False))
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < tolerance
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.75


def test_llama_cpp_tokenizes_like_transformers(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    path = export_gguf(tiny_llama[1], tmp_path / "m.gguf", "f16", progress=False)
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    hf = AutoTokenizer.from_pretrained(tiny_llama[1])
    for text in ["Hello world! 123 4567", "<|im_start|>user\nHi there<|im_end|>\n", "ünïcödé 日本語 🤗  x"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == hf.encode(text)


@pytest.mark.parametrize("quant", ["q4_k_m", "q5_k_m", "q6_k", "q8_0"])
@pytest.mark.parametrize("fixture", ["tiny_llama", "kquant_llama"])
def test_llama_quantize_agrees_on_types_and_blocks(request, tmp_path, quant, fixture):
    model, model_dir = request.getfixturevalue(fixture)
    bf16_dir = tmp_path / "bf16"
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(bf16_dir)  # llama-quantize reads bf16: same input
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(model_dir / f, bf16_dir / f)
    ours = export_gguf(bf16_dir, tmp_path / "ours.gguf", quant, progress=False)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = FTYPE[quant], 2
    src = export_gguf(bf16_dir, tmp_path / "bf16.gguf", "bf16", progress=False)
    ref = tmp_path / "ref.gguf"
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(ref).encode(), ctypes.byref(params)) == 0
    a = {t.name: t for t in GGUFReader(ours).tensors}
    b = {t.name: t for t in GGUFReader(ref).tensors}
    assert {n: t.tensor_type for n, t in a.items()} == {n: t.tensor_type for n, t in b.items()}
    for name, t in a.items():
        size = GGML_QUANT_SIZES[t.tensor_type][1]
        x, y = np.asarray(t.data).reshape(-1, size), np.asarray(b[name].data).reshape(-1, size)
        same = (x == y).all(axis=1).mean()
        assert same >= (0.9 if t.tensor_type in (T.Q4_K, T.Q5_K, T.Q6_K) else 1.0), name


def test_llama_cpp_tokenizes_a_sentencepiece_style_vocab_like_transformers(spm_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    from .conftest import save_llama

    save_llama(tmp_path / "hf", spm_tokenizer_dir, vocab_size=512)
    path = export_gguf(tmp_path / "hf", tmp_path / "m.gguf", "f16", progress=False)
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    texts = ["Beautiful is better than ugly.", "Simple is better than complex 42", "ünïcode 🤗 and rules"]
    for text in texts:
        assert llm.tokenize(text.encode(), add_bos=False) == hf.encode(text, add_special_tokens=False), text
