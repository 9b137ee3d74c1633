"""Qwen2 / Qwen2.5 (and DeepSeek-R1-Distill-Qwen): bias on q/k/v but not o, a large rope base, tied embeddings on
the small sizes. Their config.json carries sliding-window settings that are off (use_sliding_window false); when on,
layers from max_window_layers up use the window, as in transformers.
"""

from __future__ import annotations

from typing import Any

from velotune.models.config import ModelConfig
from velotune.models.families.common import common_from_gguf, common_from_hf, common_to_hf
from velotune.models.families.spec import FamilySpec


def sliding_from_hf(c: dict[str, Any]) -> tuple[int | None, list[str] | None]:
    """(sliding_window, layer_types) of Qwen-style configs: nothing unless use_sliding_window is true."""
    window = c.get("sliding_window") if c.get("use_sliding_window") else None
    if window is None:
        return None, None
    types = c.get("layer_types")
    if types is None:
        first = c.get("max_window_layers", 28)
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(c["num_hidden_layers"])]
    return window, list(types)


def sliding_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    types = cfg.layer_types or ["sliding_attention" if cfg.sliding_window else "full_attention"] * cfg.num_layers
    return {
        "use_sliding_window": cfg.sliding_window is not None,
        "sliding_window": cfg.sliding_window,
        "max_window_layers": cfg.num_layers,
        "layer_types": types,
    }


def from_hf(c: dict[str, Any]) -> ModelConfig:
    window, types = sliding_from_hf(c)
    return common_from_hf(c, attention_bias=True, o_bias=False, sliding_window=window, layer_types=types)


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return common_to_hf(cfg, "Qwen2ForCausalLM", **sliding_to_hf(cfg))


def from_gguf(meta: dict[str, Any]) -> ModelConfig:
    return common_from_gguf(meta, "qwen2", attention_bias=True, o_bias=False)


SPEC = FamilySpec(
    name="qwen2",
    model_types=("qwen2",),
    from_hf=from_hf,
    to_hf=to_hf,
    from_gguf=from_gguf,
    gguf_arch="qwen2",
    default_template="chatml",
)
