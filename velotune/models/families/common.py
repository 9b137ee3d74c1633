"""What most families' config.json and GGUF metadata share: the fields every decoder has, read and written once.

A family module calls these with its own overrides (bias, norms, attention variants), so its file holds only what
makes the family different.
"""

from __future__ import annotations

import copy
from typing import Any

from velotune.errors import ConfigError
from velotune.models.config import ModelConfig
from velotune.models.rope import llama3_scaling_from_factors

_ROPE_KEYS_NOT_SCALING = ("rope_theta", "partial_rotary_factor")


def rope_from_hf(c: dict[str, Any], default_theta: float = 10000.0) -> tuple[float, dict[str, Any] | None, float]:
    """(rope_theta, rope_scaling, partial_rotary_factor) from config.json: transformers 4 (rope_theta, rope_scaling,
    partial_rotary_factor at the top) or 5 (one rope_parameters dict)."""
    params = dict(c.get("rope_parameters") or {})
    theta = params.get("rope_theta", c.get("rope_theta", default_theta))
    partial = params.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    scaling = dict(c.get("rope_scaling") or {k: v for k, v in params.items() if k not in _ROPE_KEYS_NOT_SCALING})
    kind = scaling.pop("type", None)
    if kind is not None:
        scaling.setdefault("rope_type", kind)  # transformers 4 spelled it "type"
    if scaling.get("rope_type", "default") == "default":
        scaling = {}
    return float(theta), scaling or None, float(partial if partial is not None else 1.0)


def rope_to_hf(theta: float, scaling: dict[str, Any] | None, partial: float = 1.0) -> dict[str, Any]:
    """A transformers 5 rope_parameters dict."""
    out: dict[str, Any] = {"rope_type": "default", **(scaling or {}), "rope_theta": theta}
    if partial != 1.0:
        out["partial_rotary_factor"] = partial
    return out


def activation_from_hf(c: dict[str, Any], default: str = "silu") -> str:
    """Our activation name for config.json's hidden_act / hidden_activation."""
    act = c.get("hidden_activation") or c.get("hidden_act") or default
    ours = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}.get(act)
    if ours is None:
        raise ConfigError(f"hidden activation {act!r} is not supported; supported: silu, gelu_pytorch_tanh")
    return ours


def common_from_hf(c: dict[str, Any], **overrides: Any) -> ModelConfig:
    """ModelConfig from the fields every config.json has; `overrides` sets the family's own knobs."""
    theta, scaling, partial = rope_from_hf(c)
    heads = c["num_attention_heads"]
    fields: dict[str, Any] = dict(
        model_type=c["model_type"],
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_layers=c["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim"),
        rms_norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        partial_rotary_factor=partial,
        max_position_embeddings=c.get("max_position_embeddings", 4096),
        tie_word_embeddings=c.get("tie_word_embeddings", False),
        activation=activation_from_hf(c),
        bos_token_id=c.get("bos_token_id"),
        eos_token_id=c.get("eos_token_id"),
        pad_token_id=c.get("pad_token_id"),
        extra={"hf_config": c},
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def common_to_hf(cfg: ModelConfig, architecture: str, **extra: Any) -> dict[str, Any]:
    """A config.json for transformers; the checkpoint's own one when the model came from one."""
    if "hf_config" in cfg.extra:
        return copy.deepcopy(cfg.extra["hf_config"])
    rope = rope_to_hf(cfg.rope_theta, cfg.rope_scaling, cfg.partial_rotary_factor)
    out = {
        "architectures": [architecture],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "rope_parameters": rope,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "hidden_act": "silu" if cfg.activation == "silu" else "gelu_pytorch_tanh",
        "torch_dtype": "bfloat16",
    }
    out.update(extra)
    return copy.deepcopy(out)  # transformers' config classes edit rope dicts in place; keep ours untouched


def common_from_gguf(meta: dict[str, Any], model_type: str, **overrides: Any) -> ModelConfig:
    """ModelConfig from GGUF key/values (keys without the `<arch>.` prefix, plus `vocab_size` and `tied`)."""
    heads = int(meta["attention.head_count"])
    hidden = int(meta["embedding_length"])
    head_dim = int(meta.get("attention.key_length", hidden // heads))
    rope_dims = meta.get("rope.dimension_count")
    fields: dict[str, Any] = dict(
        model_type=model_type,
        vocab_size=int(meta["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(meta["feed_forward_length"]),
        num_layers=int(meta["block_count"]),
        num_heads=heads,
        num_kv_heads=int(meta.get("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(meta.get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta.get("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling_from_gguf(meta),
        partial_rotary_factor=int(rope_dims) / head_dim if rope_dims else 1.0,
        max_position_embeddings=int(meta.get("context_length", 4096)),
        tie_word_embeddings=bool(meta["tied"]),
        bos_token_id=meta.get("bos_token_id"),
        eos_token_id=meta.get("eos_token_id"),
        pad_token_id=meta.get("pad_token_id"),
    )
    if "rope_freqs" in meta:
        rotated = int(rope_dims) if rope_dims else head_dim
        fields["rope_scaling"] = llama3_scaling_from_factors(meta["rope_freqs"], rotated, fields["rope_theta"])
    fields.update(overrides)
    return ModelConfig(**fields)


def rope_scaling_from_gguf(meta: dict[str, Any]) -> dict[str, Any] | None:
    """rope_scaling from llama.cpp's rope.scaling.* keys (linear, yarn); None when absent or "none"."""
    kind = meta.get("rope.scaling.type", "none")
    if kind == "none" or "rope.scaling.factor" not in meta:
        return None
    if kind not in ("linear", "yarn"):
        raise ConfigError(f"GGUF rope.scaling.type {kind!r} is not supported; supported: linear, yarn")
    out: dict[str, Any] = {"rope_type": kind, "factor": float(meta["rope.scaling.factor"])}
    if "rope.scaling.original_context_length" in meta:
        out["original_max_position_embeddings"] = int(meta["rope.scaling.original_context_length"])
    return out
