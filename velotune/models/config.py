"""ModelConfig: every switch the one decoder understands.

A family module (models/families/<family>.py) turns a Hugging Face config.json or GGUF metadata into this;
the decoder reads nothing else. Fields default to plain Llama behaviour.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from velotune.errors import ConfigError

LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None  # None: hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # HF rope_scaling dict: llama3, linear, yarn, longrope
    partial_rotary_factor: float = 1.0  # fraction of each head's channels that rotate (Phi-4-mini: 0.75)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v
    o_bias: bool = False
    mlp_bias: bool = False
    activation: str = "silu"  # silu (SwiGLU) | gelu_tanh (GeGLU)
    qk_norm: bool = False  # RMSNorm per head on q and k (Qwen3, Gemma 3)
    norm_offset: float = 0.0  # Gemma: weight applied as (1 + w)
    embedding_scale: float | None = None  # Gemma: sqrt(hidden_size)
    sandwich_norm: bool = False  # Gemma 2/3: norms before and after each sublayer
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    residual_scale: float = 1.0  # each sublayer's output is multiplied by this before the residual add (Granite)
    logit_scale: float = 1.0  # the logits are divided by this (Granite's logits_scaling)
    sliding_window: int | None = None
    layer_types: list[str] | None = None  # per layer: "full_attention" | "sliding_attention"
    rope_local_theta: float | None = None  # rope base of sliding layers (Gemma 3); None: as global layers
    rope_local_scaling: dict[str, Any] | None = None  # rope scaling of sliding layers when rope_local_theta is set
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # family-specific values kept for round trips

    def __post_init__(self) -> None:
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; set head_dim"
                )
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.activation not in ("silu", "gelu_tanh"):
            raise ConfigError(f"activation {self.activation!r} is not supported; expected silu or gelu_tanh")
        if self.layer_types is not None and len(self.layer_types) != self.num_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        unknown = sorted(set(self.layer_types or ()) - set(LAYER_TYPES))
        if unknown:
            raise ConfigError(f"layer_types {unknown} are not supported; expected {' or '.join(LAYER_TYPES)}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"sliding_window must be a positive number of tokens or None, got {self.sliding_window}")
        if not 0 < self.partial_rotary_factor <= 1 or self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ConfigError(
                f"partial_rotary_factor {self.partial_rotary_factor} of head_dim {self.head_dim} must give an even "
                "number of rotary channels in (0, head_dim]"
            )
        for name in ("attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar", "embedding_scale"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be positive or None, got {value}")

    @property
    def rotary_dim(self) -> int:
        """Channels of each head that rotary embedding turns: head_dim * partial_rotary_factor."""
        return int(self.head_dim * self.partial_rotary_factor)

    def is_sliding(self, layer: int) -> bool:
        """Whether layer `layer` uses sliding-window attention."""
        if self.sliding_window is None:
            return False
        if self.layer_types is None:
            return True
        return self.layer_types[layer] == "sliding_attention"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
