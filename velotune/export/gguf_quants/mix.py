"""Which GGML type each tensor gets, per export quant name: llama.cpp's choices, written as one function.

Float exports (f16, bf16, q8_0) follow llama.cpp's `convert_hf_to_gguf.py`: 1-D tensors (norms, biases, rope
factors) are F32, every 2-D weight takes the export type, and a Q8_0 tensor whose rows are not a multiple of 32
falls back to F16.

K-quant exports follow `llama-quantize` (src/llama-quant.cpp, `llama_tensor_get_type`) for a dense model
without an importance matrix. 1-D tensors stay F32. For the 2-D weights:

| tensor                       | q4_k_m                      | q5_k_m                      | q6_k |
|------------------------------|-----------------------------|-----------------------------|------|
| output (or token_embd, tied) | Q6_K                        | Q6_K                        | Q6_K |
| token_embd (untied)          | Q4_K                        | Q5_K                        | Q6_K |
| attn_v (and fused attn_qkv)  | Q6_K on "more bits" layers, | Q6_K on "more bits" layers, | Q6_K |
|                              | else Q4_K (Q5_K at 70B)     | else Q5_K                   |      |
| ffn_down                     | Q6_K on "more bits" layers  | Q6_K on "more bits" layers  | Q6_K |
| everything else              | Q4_K                        | Q5_K                        | Q6_K |

"More bits" layers of n: the first n/8, the last n/8, and every third layer in between (`(i - n/8) % 3 == 2`).
Row lengths that are not a multiple of 256 cannot hold a k-quant block; llama.cpp then falls back Q4_K -> Q5_0,
Q5_K -> Q5_1, Q6_K -> Q8_0, and to F16 when rows are not a multiple of 32 either. The output tensor checks this
first and goes straight to Q8_0. "70B" is llama.cpp's model-size label: 80 layers with grouped-query attention.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType, LlamaFileType

from velotune.export.gguf_quants import QUANTIZERS

T = GGMLQuantizationType


@dataclass(frozen=True)
class ExportType:
    """One value of export_gguf's `quant`: the GGUF file type and the type most tensors get."""

    file_type: LlamaFileType
    default: GGMLQuantizationType
    k_mix: bool  # llama-quantize's per-tensor mix rather than convert_hf_to_gguf's single type


EXPORT_TYPES: dict[str, ExportType] = {
    "f16": ExportType(LlamaFileType.MOSTLY_F16, T.F16, False),
    "bf16": ExportType(LlamaFileType.MOSTLY_BF16, T.BF16, False),
    "q8_0": ExportType(LlamaFileType.MOSTLY_Q8_0, T.Q8_0, False),
    "q4_k_m": ExportType(LlamaFileType.MOSTLY_Q4_K_M, T.Q4_K, True),
    "q5_k_m": ExportType(LlamaFileType.MOSTLY_Q5_K_M, T.Q5_K, True),
    "q6_k": ExportType(LlamaFileType.MOSTLY_Q6_K, T.Q6_K, True),
}

_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0, T.Q8_0: T.F16, T.Q5_0: T.F16, T.Q5_1: T.F16}


@dataclass(frozen=True)
class ModelShape:
    """What the mix needs to know about the whole model."""

    n_layer: int
    has_output: bool  # False when the output projection is tied to token_embd
    is_70b: bool = False


def _more_bits(i_layer: int, n_layer: int) -> bool:
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def _layer(name: str) -> int:
    """Block index of a `blk.N.*` tensor name."""
    return int(name.split(".")[1])


def _fits(qtype: GGMLQuantizationType, row_len: int) -> bool:
    return QUANTIZERS[qtype].fits(row_len)


def _fallback(qtype: GGMLQuantizationType, row_len: int) -> GGMLQuantizationType:
    while not _fits(qtype, row_len):
        qtype = _FALLBACK[qtype]
    return qtype


def _k_mix(name: str, row_len: int, quant: str, model: ModelShape) -> GGMLQuantizationType:
    """llama-quantize's type for one 2-D tensor under q4_k_m / q5_k_m / q6_k, before the row-length fallback."""
    new = EXPORT_TYPES[quant].default
    more_bits_mix = quant in ("q4_k_m", "q5_k_m")
    if name == "output.weight" or (name == "token_embd.weight" and not model.has_output):
        return T.Q8_0 if not _fits(new, row_len) else T.Q6_K
    if name == "token_embd.weight":
        return new
    if "attn_v.weight" in name or "attn_qkv.weight" in name:
        if more_bits_mix and _more_bits(_layer(name), model.n_layer):
            new = T.Q6_K
        if model.is_70b and new == T.Q4_K:
            new = T.Q5_K
        return new
    if "ffn_down" in name and more_bits_mix and _more_bits(_layer(name), model.n_layer):
        return T.Q6_K
    return new


def tensor_type(name: str, shape: tuple[int, ...], quant: str, model: ModelShape) -> GGMLQuantizationType:
    """GGML type for GGUF tensor `name` of numpy `shape` (rows last) in an export of `quant`."""
    if len(shape) < 2:
        return T.F32
    row_len = shape[-1]
    spec = EXPORT_TYPES[quant]
    qtype = _k_mix(name, row_len, quant, model) if spec.k_mix else spec.default
    return _fallback(qtype, row_len)
