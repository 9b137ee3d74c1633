"""Our k-quant writers: bytes gguf-py decodes to exactly what we decode, errors at llama.cpp's level, llama.cpp's mix.

RMSE bounds were measured on `_gaussian()` (numpy default_rng(0), 256 x 1024 standard normal) with this code:
Q4_K 0.0713, Q5_K 0.0361, Q6_K 0.0177, Q8_0 0.0054; ggml's own reference quantizer gives the same values to
four digits (see test_kquants_match_ggml_reference, run with -m llamacpp where ggml-python is installed).
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize

from velotune.export.gguf_quants import QUANTIZERS
from velotune.export.gguf_quants.mix import ModelShape, tensor_type

KQUANTS = [T.Q4_K, T.Q5_K, T.Q6_K]
RMSE_BOUND = {T.Q4_K: 0.0720, T.Q5_K: 0.0365, T.Q6_K: 0.0180, T.Q8_0: 0.0055}


def _gaussian(rows: int = 256, cols: int = 1024) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)


def _awkward() -> np.ndarray:
    """Blocks that exercise the edge paths: zeros, constants, one-signed, a spike, tiny and large magnitudes."""
    rng = np.random.default_rng(1)
    blocks = [
        np.zeros(256),
        np.full(256, 0.5),
        np.full(256, -0.25),
        np.abs(rng.standard_normal(256)),
        -np.abs(rng.standard_normal(256)),
        np.where(np.arange(256) == 17, 40.0, 0.01 * rng.standard_normal(256)),
        1e-7 * rng.standard_normal(256),
        300.0 * rng.standard_normal(256),
        np.concatenate([np.zeros(128), rng.standard_normal(128)]),
        rng.standard_t(2, 256),
    ]
    return np.stack(blocks).astype(np.float32)


def _rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2)))


@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda t: t.name)
@pytest.mark.parametrize("data", [_gaussian, _awkward], ids=["gaussian", "awkward"])
def test_kquant_bytes_decode_identically_in_gguf_py(qtype, data):
    x = data()
    q = QUANTIZERS[qtype].quantize(x)
    assert q.dtype == np.uint8 and q.shape == (x.shape[0], x.shape[1] // 256 * GGML_QUANT_SIZES[qtype][1])
    ours = QUANTIZERS[qtype].dequantize(q)
    theirs = gguf_dequantize(q, qtype)
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))  # bit for bit
    assert np.isfinite(ours).all()


@pytest.mark.parametrize("qtype", [*KQUANTS, T.Q8_0], ids=lambda t: t.name)
def test_quantization_error_on_gaussian_data_is_llama_cpp_level(qtype):
    x = _gaussian()
    assert _rmse(gguf_dequantize(QUANTIZERS[qtype].quantize(x), qtype), x) < RMSE_BOUND[qtype]


def test_more_bits_means_less_error():
    x = _gaussian()
    err = {t: _rmse(gguf_dequantize(QUANTIZERS[t].quantize(x), t), x) for t in KQUANTS}
    assert err[T.Q6_K] < err[T.Q5_K] < err[T.Q4_K]
    assert err[T.Q4_K] / err[T.Q5_K] > 1.8 and err[T.Q5_K] / err[T.Q6_K] > 1.8  # about one bit apart each


@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda t: t.name)
def test_zero_and_constant_blocks_round_trip_exactly(qtype):
    x = np.stack([np.zeros(256), np.full(256, 0.5), np.full(256, -2.0)]).astype(np.float32)
    back = gguf_dequantize(QUANTIZERS[qtype].quantize(x), qtype)
    np.testing.assert_array_equal(back[0], 0)
    np.testing.assert_allclose(back[1:], x[1:], rtol=2e-3)


def _ggml_quantize(x: np.ndarray, qtype: T) -> np.ndarray:
    ggml = pytest.importorskip("ggml", reason="pip install ggml-python (compiles ggml)")
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros(x.size // 256 * GGML_QUANT_SIZES[qtype][1], dtype=np.uint8)
    src = x.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    ggml.ggml_quantize_chunk(int(qtype), src, out.ctypes.data_as(ctypes.c_void_p), 0, x.shape[0], x.shape[1], None)
    return out.reshape(x.shape[0], -1)


@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda t: t.name)
def test_kquants_match_ggml_reference(qtype):
    """Against ggml's C quantizer (pip install ggml-python): the same blocks but for near-ties of float sums.
    Opt-in with the llama.cpp tests: ggml-python has no wheel on PyPI, so installing it compiles ggml."""
    x = np.concatenate([_gaussian(64), 0.02 * _gaussian(64), np.random.default_rng(2).standard_t(3, (64, 1024))])
    x = x.astype(np.float32)
    ref = _ggml_quantize(x, qtype)
    ours = QUANTIZERS[qtype].quantize(x)
    size = GGML_QUANT_SIZES[qtype][1]
    same = (ours.reshape(-1, size) == ref.reshape(-1, size)).all(axis=1).mean()
    assert same > 0.9
    ours_err = _rmse(gguf_dequantize(ours, qtype), x)
    ref_err = _rmse(gguf_dequantize(ref, qtype), x)
    assert ours_err < 1.002 * ref_err  # never measurably worse than llama.cpp's


def _types(quant: str, n_layer: int, cols: int = 4096, tied: bool = False) -> dict[str, T]:
    model = ModelShape(n_layer=n_layer, has_output=not tied)
    names = ["token_embd.weight", "output_norm.weight"] + ([] if tied else ["output.weight"])
    names += [f"blk.{i}.{t}.weight" for i in range(n_layer) for t in ("attn_q", "attn_v", "ffn_down", "ffn_up")]
    shapes = {n: (cols,) if "norm" in n else (cols, cols) for n in names}
    return {n: tensor_type(n, shapes[n], quant, model) for n in names}


def test_q4_k_m_mix_follows_llama_quantize_for_a_32_layer_model():
    types = _types("q4_k_m", 32)
    # llama.cpp's use_more_bits(i, 32): i < 4, i >= 28, or (i - 4) % 3 == 2
    six_bit = [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert [i for i in range(32) if types[f"blk.{i}.attn_v.weight"] == T.Q6_K] == six_bit
    assert [i for i in range(32) if types[f"blk.{i}.ffn_down.weight"] == T.Q6_K] == six_bit
    assert {types[f"blk.{i}.attn_v.weight"] for i in range(32) if i not in six_bit} == {T.Q4_K}
    assert {types[f"blk.{i}.attn_q.weight"] for i in range(32)} == {T.Q4_K}
    assert types["output.weight"] == T.Q6_K and types["token_embd.weight"] == T.Q4_K
    assert types["output_norm.weight"] == T.F32


def test_q5_k_m_and_q6_k_mixes():
    q5 = _types("q5_k_m", 32)
    assert q5["blk.0.ffn_down.weight"] == T.Q6_K and q5["blk.4.ffn_down.weight"] == T.Q5_K
    assert q5["blk.4.attn_q.weight"] == T.Q5_K and q5["output.weight"] == T.Q6_K
    assert set(_types("q6_k", 8).values()) == {T.Q6_K, T.F32}


def test_tied_embeddings_get_the_output_type():
    assert _types("q4_k_m", 8, tied=True)["token_embd.weight"] == T.Q6_K


def test_rows_not_a_multiple_of_256_fall_back_like_llama_quantize():
    types = _types("q4_k_m", 8, cols=64)  # 64 = 2 blocks of 32
    assert types["blk.4.attn_q.weight"] == T.Q5_0  # Q4_K -> Q5_0
    assert types["blk.0.attn_v.weight"] == T.Q8_0  # Q6_K -> Q8_0
    assert types["output.weight"] == T.Q8_0
    assert _types("q5_k_m", 8, cols=64)["blk.4.attn_q.weight"] == T.Q5_1
    assert _types("q4_k_m", 8, cols=48)["blk.4.attn_q.weight"] == T.F16  # not even 32-divisible
    assert _types("q8_0", 8, cols=48)["blk.4.attn_q.weight"] == T.F16


def test_70b_attn_v_gets_q5_k_instead_of_q4_k():
    model = ModelShape(n_layer=80, has_output=True, is_70b=True)
    assert tensor_type("blk.40.attn_v.weight", (1024, 8192), "q4_k_m", model) == T.Q5_K
    assert tensor_type("blk.42.attn_v.weight", (1024, 8192), "q4_k_m", model) == T.Q6_K  # (42 - 80/8) % 3 == 2
