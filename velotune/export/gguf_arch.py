"""Per-family GGUF facts: which llama.cpp architecture a Hugging Face `model_type` becomes, and its metadata.

We write GGUF ourselves (no llama.cpp build), so the part of llama.cpp's `convert_hf_to_gguf.py` we rely on lives
here as data: a dict from `model_type` to an `ArchSpec`. Tensor names come from gguf-py's `TensorNameMap` for the
spec's architecture; the spec adds what differs by family (llama's q/k row permutation, qwen3's explicit head size,
llama-3's rope factors). A family not in `FAMILIES` is refused with the list of those that are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, GGUFWriter, RopeScalingType

from velotune.errors import ExportError


@dataclass(frozen=True)
class ArchSpec:
    """How one Hugging Face family maps onto a llama.cpp architecture."""

    arch: MODEL_ARCH
    permute_qk: bool = False  # llama.cpp's llama graph wants q/k rows in its own rotary order (see `permute_qk`)
    head_dim_keys: bool = False  # write attention.key_length / value_length (head_dim not hidden / heads)
    llama3_rope_freqs: bool = False  # rope_type "llama3" becomes a rope_freqs.weight tensor of per-dim factors

    @property
    def name(self) -> str:
        return MODEL_ARCH_NAMES[self.arch]


FAMILIES: dict[str, ArchSpec] = {
    "llama": ArchSpec(MODEL_ARCH.LLAMA, permute_qk=True, llama3_rope_freqs=True),
    "mistral": ArchSpec(MODEL_ARCH.LLAMA, permute_qk=True),  # llama.cpp runs Mistral 7B-style models as llama
    "qwen2": ArchSpec(MODEL_ARCH.QWEN2),
    "qwen3": ArchSpec(MODEL_ARCH.QWEN3, head_dim_keys=True),
}


def arch_spec(model_type: str) -> ArchSpec:
    """The ArchSpec for `model_type`, or ExportError naming the supported ones."""
    spec = FAMILIES.get(model_type)
    if spec is None:
        raise ExportError(
            f"no GGUF mapping for model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}. "
            "Keep the Hugging Face export of this model, or convert it with llama.cpp's convert_hf_to_gguf.py."
        )
    return spec


@dataclass(frozen=True)
class HParams:
    """The config.json fields the GGUF metadata and tensor layout need, with Hugging Face defaults filled in."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    head_dim_explicit: bool
    n_ctx: int
    rms_eps: float
    vocab_size: int
    rope: dict[str, Any]  # rope_theta, rope_type and the scaling fields, merged from rope_parameters/rope_scaling
    tie_embeddings: bool

    @property
    def rope_theta(self) -> float:
        return float(self.rope.get("rope_theta", 10000.0))

    @property
    def rope_type(self) -> str:
        return str(self.rope.get("rope_type", self.rope.get("type", "default")))


_REQUIRED = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")


def read_hparams(cfg: dict[str, Any], config_path: str) -> HParams:
    """HParams from a parsed config.json; ExportError naming any missing field."""
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise ExportError(f"{config_path}: missing {', '.join(missing)}; GGUF export needs a complete decoder config")
    n_head = int(cfg["num_attention_heads"])
    explicit = cfg.get("head_dim") is not None
    head_dim = int(cfg["head_dim"]) if explicit else int(cfg["hidden_size"]) // n_head
    rope: dict[str, Any] = {}
    if cfg.get("rope_theta") is not None:
        rope["rope_theta"] = cfg["rope_theta"]
    rope.update(cfg.get("rope_scaling") or {})  # transformers 4.x
    rope.update(cfg.get("rope_parameters") or {})  # transformers 5.x
    return HParams(
        n_layer=int(cfg["num_hidden_layers"]),
        n_embd=int(cfg["hidden_size"]),
        n_ff=int(cfg["intermediate_size"]),
        n_head=n_head,
        n_head_kv=int(cfg.get("num_key_value_heads") or n_head),
        head_dim=head_dim,
        head_dim_explicit=explicit,
        n_ctx=int(cfg.get("max_position_embeddings", 4096)),
        rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        vocab_size=int(cfg["vocab_size"]),
        rope=rope,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


_ROPE_SCALING = {"linear": RopeScalingType.LINEAR, "yarn": RopeScalingType.YARN}


def add_hparams(writer: GGUFWriter, spec: ArchSpec, hp: HParams) -> None:
    """Write the architecture's hyperparameter keys ({arch}.block_count ... rope scaling)."""
    writer.add_context_length(hp.n_ctx)
    writer.add_embedding_length(hp.n_embd)
    writer.add_feed_forward_length(hp.n_ff)
    writer.add_block_count(hp.n_layer)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_rope_dimension_count(hp.head_dim)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    writer.add_vocab_size(hp.vocab_size)
    if spec.head_dim_keys or (hp.head_dim_explicit and hp.head_dim * hp.n_head != hp.n_embd):
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)
    rope_type = hp.rope_type
    if rope_type in _ROPE_SCALING:
        writer.add_rope_scaling_type(_ROPE_SCALING[rope_type])
        writer.add_rope_scaling_factor(float(hp.rope["factor"]))
        if "original_max_position_embeddings" in hp.rope:
            writer.add_rope_scaling_orig_ctx_len(int(hp.rope["original_max_position_embeddings"]))
    elif rope_type == "llama3" and spec.llama3_rope_freqs:
        pass  # carried by the rope_freqs.weight tensor, see `llama3_rope_factors`
    elif rope_type != "default":
        raise ExportError(
            f"rope_type {rope_type!r} has no GGUF form for {spec.name}; supported: default, linear, yarn"
            + (", llama3" if spec.llama3_rope_freqs else "")
            + ". Remove rope_scaling from config.json if the model was not trained with it, or keep the HF export."
        )


def llama3_rope_factors(hp: HParams) -> np.ndarray | None:
    """Per-frequency divisors llama.cpp applies for rope_type 'llama3' (its rope_freqs.weight), else None.

    Wavelengths shorter than original_ctx / high_freq_factor keep their frequency, longer than
    original_ctx / low_freq_factor are slowed by `factor`, and the band between is interpolated smoothly.
    """
    if hp.rope_type != "llama3":
        return None
    factor = float(hp.rope.get("factor", 8.0))
    low, high = float(hp.rope.get("low_freq_factor", 1.0)), float(hp.rope.get("high_freq_factor", 4.0))
    old_ctx = float(hp.rope.get("original_max_position_embeddings", 8192))
    inv_freq = 1.0 / (hp.rope_theta ** (np.arange(0, hp.head_dim, 2, dtype=np.float32) / hp.head_dim))  # (hd/2,)
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - low) / (high - low)
    factors = np.where(
        wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, 1 / ((1 - smooth) / factor + smooth))
    )
    return factors.astype(np.float32)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF q/k rows -> llama.cpp's rotary order, per head: (2, hd/2) row pairs become (hd/2, 2). (rows, cols) in/out.

    Hugging Face rotates dimension i with i + hd/2; llama.cpp's llama graph rotates 2i with 2i + 1, so each head's
    rows are interleaved. `n_head` is the number of heads in `w` (kv heads for k_proj).
    """
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
