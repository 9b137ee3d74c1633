"""GGUF import per family: tiny random transformers models written as llama.cpp's convert_hf_to_gguf.py lays them
out (its tensor names, Gemma norms stored as 1 + w, llama q/k rows interleaved, Phi-3 fused qkv/gate_up and longrope
factor tensors), read back by velotune and compared with the transformers model they came from. (transformers' own GGUF
loader fills what the metadata lacks with full-size defaults, e.g. Gemma's query_pre_attn_scalar 256, so it is the
reference only for the real Gemma 3 file in test_gemma3_gguf.py.)
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from tests.models.test_families import SMALL, _batch, hf_model, randomized_hf_model
from velotune.errors import UnsupportedArchitectureError
from velotune.models.gguf_import import load_gguf


def _gemma2_for_gguf():
    from transformers import Gemma2Config

    # llama.cpp derives the attention scale from head_dim (all sizes but 27B) and alternates from layer 0
    return Gemma2Config(
        **SMALL,
        head_dim=16,
        query_pre_attn_scalar=16,
        attn_logit_softcapping=0.5,
        final_logit_softcapping=1.5,
        sliding_window=8,
        pad_token_id=0,
    )


def _gemma3_for_gguf():
    from transformers import Gemma3TextConfig

    # llama.cpp: every 6th layer global, sliding layers on rope base 10000, global on rope.freq_base
    small = {**SMALL, "num_hidden_layers": 6}
    return Gemma3TextConfig(**small, head_dim=16, query_pre_attn_scalar=16, sliding_window=8, pad_token_id=0)


def _llama_for_gguf():
    from tests.conftest import tiny_llama_config

    return tiny_llama_config(attn_implementation="eager")


GGUF_CASES = {  # case -> (llama.cpp architecture, transformers config; None: test_families' case of that name)
    "llama": ("llama", _llama_for_gguf),
    "qwen2": ("qwen2", None),
    "qwen3": ("qwen3", None),
    "gemma2": ("gemma2", _gemma2_for_gguf),
    "gemma3": ("gemma3", _gemma3_for_gguf),
    "phi3": ("phi3", None),
    "phi3-longrope-partial": ("phi3", None),
}


def _model(case: str):
    config = GGUF_CASES[case][1]
    return hf_model(case) if config is None else randomized_hf_model(config())


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row interleave for `llama` files."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, hf, arch: str) -> None:
    """`hf` as a llama.cpp GGUF file of architecture `arch`, all tensors F32."""
    c = hf.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    if getattr(c, "sliding_window", None):
        w.add_sliding_window(c.sliding_window)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
        w.add_final_logit_softcapping(c.final_logit_softcapping)
    tensors = dict(hf.state_dict())
    if rope.get("rope_type") == "longrope":
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        tensors["rope_factors_long.weight"] = torch.tensor(rope["long_factor"])
        tensors["rope_factors_short.weight"] = torch.tensor(rope["short_factor"])
    w.add_token_list([f"<t{i}>" for i in range(c.vocab_size)])
    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    names = gguf.get_tensor_name_map(arch_enum, c.num_hidden_layers)
    for name, t in tensors.items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        gname = name if name.startswith("rope_factors") else names.get_name(name, try_suffixes=(".weight", ".bias"))
        arr = t.detach().float().numpy().copy()
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            arr = arr + 1.0
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = c.num_attention_heads if "q_proj" in name else c.num_key_value_heads
            arr = _permute(arr, heads)
        w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_gguf_import_equals_the_transformers_model_it_was_written_from(case, tmp_path):
    hf = _model(case)
    path = tmp_path / f"{case}.gguf"
    write_gguf(path, hf, GGUF_CASES[case][0])
    ours = load_gguf(path, torch.float32).eval()
    ids, labels = _batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, labels=labels)
        out = ours(ids, labels=labels, return_logits=True)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)


def test_unknown_gguf_architecture_lists_the_supported_ones(tmp_path):
    path = tmp_path / "rwkv.gguf"
    w = gguf.GGUFWriter(str(path), "rwkv6")
    w.add_token_list(["a", "b"])
    w.add_tensor("token_embd.weight", np.zeros((2, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedArchitectureError, match="'rwkv6'.*gemma3.*llama.*phi3.*qwen2.*qwen3"):
        load_gguf(path, torch.float32)
