"""Rotary position embedding tables: inverse frequencies (default, linear, llama3, yarn, longrope) and cos/sin.

Each scaling is a function (dim, base, scaling dict, cfg, long) -> (inv_freq [dim/2], attention factor); the factor
multiplies cos and sin (yarn's and longrope's attention temperature). The math follows Hugging Face's
modeling_rope_utils so checkpoints behave as they were trained. Gemma 3 has a second table for its sliding layers
(own base, own scaling); longrope has a second table for sequences past its original context.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from velotune.errors import ConfigError
from velotune.models.config import ModelConfig

Scaling = dict[str, Any]


def _powers(dim: int, base: float) -> torch.Tensor:
    return base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)  # [dim/2] wavelengths / 2 pi


def _plain(dim: int, base: float) -> torch.Tensor:
    return 1.0 / _powers(dim, base)


def _default(dim: int, base: float, s: Scaling, cfg: ModelConfig, long: bool) -> tuple[torch.Tensor, float]:
    return _plain(dim, base), 1.0


def _linear(dim: int, base: float, s: Scaling, cfg: ModelConfig, long: bool) -> tuple[torch.Tensor, float]:
    return _plain(dim, base) / s["factor"], 1.0


def _llama3(dim: int, base: float, s: Scaling, cfg: ModelConfig, long: bool) -> tuple[torch.Tensor, float]:
    inv_freq = _plain(dim, base)
    factor = s["factor"]
    low, high = s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_ctx = s.get("original_max_position_embeddings") or cfg.max_position_embeddings
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled), 1.0


def _original_context(s: Scaling, cfg: ModelConfig) -> int:
    return int(s.get("original_max_position_embeddings") or cfg.max_position_embeddings)


def _yarn(dim: int, base: float, s: Scaling, cfg: ModelConfig, long: bool) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies by `factor`, keep high ones, ramp between; temperature 0.1 ln(factor) + 1."""
    old_ctx = _original_context(s, cfg)
    factor = s.get("factor") or cfg.max_position_embeddings / old_ctx

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = s.get("attention_factor")
    if attn is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attn = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency, 0: interpolate it
    powers = _powers(dim, base)
    return 1.0 / (factor * powers) * (1 - extrapolate) + 1.0 / powers * extrapolate, float(attn)


def _longrope(dim: int, base: float, s: Scaling, cfg: ModelConfig, long: bool) -> tuple[torch.Tensor, float]:
    """LongRoPE (Phi-3 "su"): per-frequency divisors, `short_factor` within the original context, `long_factor`
    past it; cos/sin scaled by sqrt(1 + ln(factor) / ln(original context))."""
    old_ctx = _original_context(s, cfg)
    factor = s.get("factor") or cfg.max_position_embeddings / old_ctx
    attn = s.get("attention_factor")
    if attn is None:
        attn = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(old_ctx))
    ext = torch.tensor(s["long_factor" if long else "short_factor"], dtype=torch.float32)
    if ext.shape != (dim // 2,):
        raise ConfigError(f"longrope factors have {ext.numel()} entries; expected rotary_dim / 2 = {dim // 2}")
    return 1.0 / (ext * _powers(dim, base)), float(attn)


ROPE_SCALINGS = {
    "default": _default,
    "linear": _linear,
    "llama3": _llama3,
    "yarn": _yarn,
    "longrope": _longrope,
}


def llama3_scaling_from_factors(factors: list[float], dim: int, base: float) -> Scaling:
    """The llama3 rope_scaling that yields llama.cpp's per-frequency divisors `factors` (a GGUF rope_freqs tensor).

    GGUF keeps only the divisors, not the four parameters Hugging Face configs carry; the parameters used by
    released models are searched (low/high frequency factors, an original context of a power of two from 32 to 1M;
    the factor is the largest divisor) and the one that
    reproduces every divisor to 1e-4 is returned. Raises ConfigError when none does.
    """
    target = torch.tensor(factors, dtype=torch.float64)
    if target.numel() != dim // 2:
        raise ConfigError(f"GGUF rope_freqs has {target.numel()} values; expected rotated dims / 2 = {dim // 2}")
    plain = _plain(dim, base).double()
    factor = float(target.max())
    for old_ctx in sorted((2**k for k in range(5, 21)), key=lambda n: abs(n - 8192)):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 4.0), (2.0, 8.0)):
            s = {
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low,
                "high_freq_factor": high,
                "original_max_position_embeddings": old_ctx,
            }
            inv_freq, _ = _llama3(dim, base, s, None, False)  # type: ignore[arg-type]  (cfg unused: old_ctx given)
            if torch.allclose(plain / inv_freq.double(), target, rtol=1e-4, atol=0):
                return s
    raise ConfigError(
        f"GGUF rope_freqs (divisors {factors[0]:.3g} .. {factor:.3g}) match no llama3 rope scaling; this file's rope "
        "scaling is not supported: load the Hugging Face checkpoint instead"
    )


def rope_kind(scaling: Scaling | None) -> str:
    """The scaling type of a HF rope_scaling dict ("default" for None)."""
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind not in ROPE_SCALINGS:
        raise ConfigError(f"rope scaling {kind!r} is not supported; supported: {', '.join(sorted(ROPE_SCALINGS))}")
    return kind


def _table(cfg: ModelConfig, local: bool, long: bool = False) -> tuple[torch.Tensor, float]:
    local = local and cfg.rope_local_theta is not None
    base = cfg.rope_local_theta if local else cfg.rope_theta
    scaling = (cfg.rope_local_scaling if local else cfg.rope_scaling) or {}
    return ROPE_SCALINGS[rope_kind(scaling)](cfg.rotary_dim, base, scaling, cfg, long)


def inv_frequencies(cfg: ModelConfig, local: bool = False, long: bool = False) -> torch.Tensor:
    """[rotary_dim / 2] float32 inverse frequencies of global (or, for Gemma 3, sliding) layers."""
    return _table(cfg, local, long)[0]


def attention_factor(cfg: ModelConfig, local: bool = False) -> float:
    """The factor yarn and longrope apply to cos and sin (1.0 for the other scalings)."""
    return _table(cfg, local)[1]


def rope_buffers(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Every inverse-frequency table the decoder keeps: inv_freq, plus inv_freq_local (a separate base for sliding
    layers) and inv_freq_long (longrope's factors past the original context) where the config has them."""
    out = {"inv_freq": inv_frequencies(cfg)}
    if cfg.rope_local_theta is not None:
        out["inv_freq_local"] = inv_frequencies(cfg, local=True)
    if rope_kind(cfg.rope_scaling) == "longrope":
        out["inv_freq_long"] = inv_frequencies(cfg, long=True)
    return out


def rope_buffer_name(cfg: ModelConfig, position_ids: torch.Tensor, local: bool) -> str:
    """Which buffer of `rope_buffers` rotates a layer (sliding or not) at these positions."""
    if local and cfg.rope_local_theta is not None:
        return "inv_freq_local"
    if rope_kind(cfg.rope_scaling) == "longrope":
        if int(position_ids.max()) + 1 > _original_context(cfg.rope_scaling, cfg):  # as HF: by the furthest position
            return "inv_freq_long"
    return "inv_freq"


def rope_tables(
    inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [B, T, rotary_dim] for positions [B, T] (HF's rotate-half layout), times `scale`."""
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)  # [B, T, dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, dim]
    if scale == 1.0:
        return emb.cos().to(dtype), emb.sin().to(dtype)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)
