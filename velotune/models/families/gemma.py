"""Gemma 2 and Gemma 3 (text): RMSNorm as (1 + w) in fp32, embeddings times sqrt(hidden_size), GeGLU (tanh),
norms before and after each sublayer, attention scale query_pre_attn_scalar ** -0.5, sliding-window layers mixed
with global ones. Gemma 2 soft-caps attention and final logits; Gemma 3 adds RMSNorm on q and k and gives sliding
layers their own rope base (global layers keep theirs, with its own scaling).

Both run in bfloat16 or float32, never float16: their activations exceed float16's range.
"""

from __future__ import annotations

from typing import Any

from velotune.errors import ConfigError
from velotune.models.config import ModelConfig
from velotune.models.families.common import (
    common_from_gguf,
    common_from_hf,
    common_to_hf,
    rope_from_hf,
    rope_to_hf,
)
from velotune.models.families.spec import FamilySpec

GEMMA3_LOCAL_THETA = 10000.0  # rope base of sliding layers unless the config says otherwise (llama.cpp hard-codes it)
GEMMA3_PATTERN = 6  # every 6th layer is global (Gemma 3's default sliding_window_pattern)


def _alternating(num_layers: int, pattern: int) -> list[str]:
    """Layer types where every `pattern`-th layer is global and the rest slide (HF's and llama.cpp's rule; 0: all
    slide)."""
    return ["sliding_attention" if not pattern or (i + 1) % pattern else "full_attention" for i in range(num_layers)]


def _gguf_layer_types(meta: dict[str, Any], num_layers: int, pattern: int) -> list[str]:
    """attention.sliding_window_pattern: a period, or one bool per layer (true: sliding); else the family's period."""
    value = meta.get("attention.sliding_window_pattern", pattern)
    if isinstance(value, list):
        return ["sliding_attention" if v else "full_attention" for v in value]
    return _alternating(num_layers, int(value))


def _gemma_knobs(c: dict[str, Any]) -> dict[str, Any]:
    """What Gemma 2 and 3 share, from config.json."""
    if c.get("use_bidirectional_attention"):
        raise ConfigError(
            f"{c['model_type']} with use_bidirectional_attention=true is an embedding model (EmbeddingGemma); "
            "velotune trains causal language models only"
        )
    bias = c.get("attention_bias", False)
    return dict(
        head_dim=c.get("head_dim", 256),
        tie_word_embeddings=c.get("tie_word_embeddings", True),
        norm_offset=1.0,
        embedding_scale=c["hidden_size"] ** 0.5,
        sandwich_norm=True,
        activation="gelu_tanh",
        attention_bias=bias,
        o_bias=bias,
        query_pre_attn_scalar=float(c.get("query_pre_attn_scalar", 256)),
        attn_logit_softcap=c.get("attn_logit_softcapping"),
        final_logit_softcap=c.get("final_logit_softcapping"),
        sliding_window=c.get("sliding_window", 4096),
    )


def gemma2_from_hf(c: dict[str, Any]) -> ModelConfig:
    types = c.get("layer_types") or _alternating(c["num_hidden_layers"], 2)
    knobs = _gemma_knobs(c)
    if "attn_logit_softcapping" not in c:
        knobs["attn_logit_softcap"] = 50.0  # Gemma2Config's defaults
    if "final_logit_softcapping" not in c:
        knobs["final_logit_softcap"] = 30.0
    return common_from_hf(c, layer_types=list(types), **knobs)


def gemma3_from_hf(c: dict[str, Any]) -> ModelConfig:
    pattern = c.get("sliding_window_pattern") or c.get("_sliding_window_pattern") or GEMMA3_PATTERN
    types = c.get("layer_types") or _alternating(c["num_hidden_layers"], pattern)
    params = c.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:  # transformers 5: one rope dict per layer type
        theta, scaling, _ = rope_from_hf({"rope_parameters": params.get("full_attention")}, 1_000_000.0)
        local_theta, local_scaling, _ = rope_from_hf({"rope_parameters": params.get("sliding_attention")})
    else:  # transformers 4: rope_theta and rope_scaling for global layers, rope_local_base_freq for sliding ones
        theta, scaling, _ = rope_from_hf(c, 1_000_000.0)
        local_theta, local_scaling = float(c.get("rope_local_base_freq", GEMMA3_LOCAL_THETA)), None
    return common_from_hf(
        c,
        layer_types=list(types),
        qk_norm=True,
        rope_theta=theta,
        rope_scaling=scaling,
        rope_local_theta=local_theta,
        rope_local_scaling=local_scaling,
        **_gemma_knobs(c),
    )


def _gemma_to_hf(cfg: ModelConfig, architecture: str, **extra: Any) -> dict[str, Any]:
    return common_to_hf(
        cfg,
        architecture,
        hidden_activation="gelu_pytorch_tanh",
        attention_bias=cfg.attention_bias,
        query_pre_attn_scalar=_int_if_whole(cfg.query_pre_attn_scalar),
        attn_logit_softcapping=cfg.attn_logit_softcap,
        final_logit_softcapping=cfg.final_logit_softcap,
        sliding_window=cfg.sliding_window,
        layer_types=cfg.layer_types,
        **extra,
    )


def _int_if_whole(x: float | None) -> float | int | None:
    return int(x) if x is not None and float(x).is_integer() else x  # transformers' config types it int


def gemma2_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return _gemma_to_hf(cfg, "Gemma2ForCausalLM")


def gemma3_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    local_theta = cfg.rope_local_theta if cfg.rope_local_theta is not None else cfg.rope_theta
    rope = {
        "full_attention": rope_to_hf(cfg.rope_theta, cfg.rope_scaling),
        "sliding_attention": rope_to_hf(local_theta, cfg.rope_local_scaling),
    }
    return _gemma_to_hf(
        cfg,
        "Gemma3ForCausalLM",
        rope_parameters=rope,
        rope_theta=cfg.rope_theta,
        rope_local_base_freq=local_theta,
        rope_scaling=cfg.rope_scaling,
    )


def _gemma_from_gguf(meta: dict[str, Any], model_type: str, big_layers: int, pattern: int, **kw: Any) -> ModelConfig:
    """Gemma knobs llama.cpp does not store: it derives them from the architecture the same way."""
    heads, hidden, layers = int(meta["attention.head_count"]), int(meta["embedding_length"]), int(meta["block_count"])
    head_dim = int(meta.get("attention.key_length", 256))
    scalar = hidden // heads if layers == big_layers else head_dim  # the 27B models scale by hidden / heads
    return common_from_gguf(
        meta,
        model_type,
        norm_offset=1.0,
        embedding_scale=hidden**0.5,
        sandwich_norm=True,
        activation="gelu_tanh",
        query_pre_attn_scalar=float(scalar),
        sliding_window=int(meta.get("attention.sliding_window", 4096)),
        layer_types=_gguf_layer_types(meta, layers, pattern),
        rms_norm_eps=float(meta.get("attention.layer_norm_rms_epsilon", 1e-6)),
        **kw,
    )


def gemma2_from_gguf(meta: dict[str, Any]) -> ModelConfig:
    return _gemma_from_gguf(
        meta,
        "gemma2",
        big_layers=46,
        pattern=2,
        attn_logit_softcap=meta.get("attn_logit_softcapping", 50.0),
        final_logit_softcap=meta.get("final_logit_softcapping", 30.0),
    )


def gemma3_from_gguf(meta: dict[str, Any]) -> ModelConfig:
    return _gemma_from_gguf(
        meta,
        "gemma3_text",
        big_layers=62,
        pattern=GEMMA3_PATTERN,
        qk_norm=True,
        rope_theta=float(meta.get("rope.freq_base", 1_000_000.0)),
        rope_local_theta=float(meta.get("rope.freq_base_swa", GEMMA3_LOCAL_THETA)),
        final_logit_softcap=meta.get("final_logit_softcapping"),
    )


GEMMA2 = FamilySpec(
    name="gemma2",
    model_types=("gemma2",),
    from_hf=gemma2_from_hf,
    to_hf=gemma2_to_hf,
    from_gguf=gemma2_from_gguf,
    gguf_arch="gemma2",
    gguf_norm_offset=1.0,
    default_template="gemma",
    float16_safe=False,
)

GEMMA3 = FamilySpec(
    name="gemma3",
    model_types=("gemma3_text",),
    from_hf=gemma3_from_hf,
    to_hf=gemma3_to_hf,
    from_gguf=gemma3_from_gguf,
    gguf_arch="gemma3",
    gguf_norm_offset=1.0,
    default_template="gemma",
    float16_safe=False,
)
