"""Llama family (Llama 2/3/3.1/3.2, DeepSeek-R1-Distill-Llama, SmolLM2): HF config and GGUF metadata <-> ModelConfig."""

from __future__ import annotations

from typing import Any

from velotune.models.config import ModelConfig
from velotune.models.families.spec import FamilySpec


def rope_from_hf(c: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from config.json: transformers 4 (rope_theta, rope_scaling) or 5 (rope_parameters)."""
    params = c.get("rope_parameters") or {}
    theta = params.get("rope_theta", c.get("rope_theta", 10000.0))
    scaling = c.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"} or None
    if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    return float(theta), scaling


def common_from_hf(c: dict[str, Any], **overrides: Any) -> ModelConfig:
    theta, scaling = rope_from_hf(c)
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
        max_position_embeddings=c.get("max_position_embeddings", 4096),
        tie_word_embeddings=c.get("tie_word_embeddings", False),
        bos_token_id=c.get("bos_token_id"),
        eos_token_id=c.get("eos_token_id"),
        pad_token_id=c.get("pad_token_id"),
        extra={"hf_config": c},
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def from_hf(c: dict[str, Any]) -> ModelConfig:
    bias = c.get("attention_bias", False)
    return common_from_hf(c, attention_bias=bias, o_bias=bias, mlp_bias=c.get("mlp_bias", False))


def common_to_hf(cfg: ModelConfig, architecture: str, **extra: Any) -> dict[str, Any]:
    """A config.json for transformers; the checkpoint's own one when the model came from one."""
    if "hf_config" in cfg.extra:
        return dict(cfg.extra["hf_config"])
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})}
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
    return out


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return common_to_hf(cfg, "LlamaForCausalLM", attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)


def from_gguf(meta: dict[str, Any]) -> ModelConfig:
    """ModelConfig from GGUF key/values (keys without the `llama.` prefix, plus `vocab_size` and `tied`)."""
    heads = int(meta["attention.head_count"])
    hidden = int(meta["embedding_length"])
    head_dim = int(meta.get("attention.key_length", hidden // heads))
    return ModelConfig(
        model_type="llama",
        vocab_size=int(meta["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(meta["feed_forward_length"]),
        num_layers=int(meta["block_count"]),
        num_heads=heads,
        num_kv_heads=int(meta.get("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(meta.get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta.get("rope.freq_base", 10000.0)),
        max_position_embeddings=int(meta.get("context_length", 4096)),
        tie_word_embeddings=bool(meta["tied"]),
        bos_token_id=meta.get("bos_token_id"),
        eos_token_id=meta.get("eos_token_id"),
        pad_token_id=meta.get("pad_token_id"),
    )


SPEC = FamilySpec(
    name="llama",
    model_types=("llama",),
    from_hf=from_hf,
    to_hf=to_hf,
    from_gguf=from_gguf,
    gguf_arch="llama",
    gguf_permute_qk=True,
    default_template="llama-3",
)
