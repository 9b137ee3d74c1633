"""Per-family GGUF facts: which llama.cpp architecture a Hugging Face `model_type` becomes, and its metadata.

We write GGUF ourselves (no llama.cpp build), so the part of llama.cpp's `convert_hf_to_gguf.py` we rely on lives
here as data: a dict from `model_type` to an `ArchSpec`. Tensor names come from gguf-py's `TensorNameMap` for the
spec's architecture; the spec adds what differs by family (llama's q/k row permutation, qwen3's explicit head size,
llama-3's rope factors, Gemma's norm +1 and soft-caps, Phi-3's longrope factors). A family not in `FAMILIES` is
refused with the list of those that are.

Phi-3 checkpoints already hold llama.cpp's fused tensors (self_attn.qkv_proj -> attn_qkv, mlp.gate_up_proj ->
ffn_up with gate rows first), so they are copied as saved. Gemma computes RMSNorm as x * (1 + w) and llama.cpp as
x * w, so every Gemma norm weight is written with 1 added.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, GGUFWriter, RopeScalingType

from velotune.errors import ExportError
from velotune.models.families import family_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchSpec:
    """How one Hugging Face family maps onto a llama.cpp architecture."""

    arch: MODEL_ARCH
    permute_qk: bool = False  # llama.cpp's llama graph wants q/k rows in its own rotary order (see `permute_qk`)
    head_dim_keys: bool = False  # write attention.key_length / value_length (head_dim not hidden / heads)
    llama3_rope_freqs: bool = False  # rope_type "llama3" becomes a rope_freqs.weight tensor of per-dim factors
    norm_offset: float = 0.0  # added to every norm weight: Gemma's x * (1 + w) is llama.cpp's x * w
    rope_types: tuple[str, ...] = ()  # rope types beyond default/linear/yarn that `extra_keys` writes (longrope)
    sliding_window: bool = False  # llama.cpp's graph for `arch` applies the config's sliding window (Gemma 2/3)
    # family keys beyond the common ones (soft-caps, sliding window, ...): (writer, hparams) -> None
    extra_keys: Callable[[GGUFWriter, HParams], None] | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        return MODEL_ARCH_NAMES[self.arch]


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
    rope_dim: int = 0  # rotated dimensions per head (head_dim * partial_rotary_factor); 0: head_dim
    rope_local: dict[str, Any] = field(default_factory=dict)  # Gemma 3 sliding layers' own rope parameters
    cfg: dict[str, Any] = field(default_factory=dict)  # the whole config.json, for family keys

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
    params = cfg.get("rope_parameters") or {}
    local: dict[str, Any] = {}
    if "full_attention" in params or "sliding_attention" in params:  # transformers 5.x, per layer type (Gemma 3)
        rope.update(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
    else:
        rope.update(params)  # transformers 5.x
    if cfg.get("rope_local_base_freq") is not None:  # Gemma 3 under transformers 4.x
        local.setdefault("rope_theta", cfg["rope_local_base_freq"])
    partial = float(cfg.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1.0)
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
        rope_dim=int(head_dim * partial),
        rope_local=local,
        cfg=cfg,
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
    writer.add_rope_dimension_count(hp.rope_dim or hp.head_dim)
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
    elif rope_type != "default" and rope_type not in spec.rope_types:
        raise ExportError(
            f"rope_type {rope_type!r} has no GGUF form for {spec.name}; supported: default, linear, yarn"
            + (", llama3" if spec.llama3_rope_freqs else "")
            + "".join(f", {t}" for t in spec.rope_types)
            + ". Remove rope_scaling from config.json if the model was not trained with it, or keep the HF export."
        )
    if spec.extra_keys is not None:
        spec.extra_keys(writer, hp)
    if not spec.sliding_window:
        _warn_window_dropped(spec, hp)


def _warn_window_dropped(spec: ArchSpec, hp: HParams) -> None:
    """Warn when the model slides a window shorter than its context but llama.cpp's graph for `spec.arch` does not.

    llama.cpp reads no sliding window for `llama` (Mistral's architecture in GGUF, as llama.cpp's own converter
    writes it; its `mistral3` graph has none either), `qwen2` or `qwen3`, and for `phi3` it reads one and switches
    it off. Those files attend to every earlier token, which is the same attention up to `window` tokens.
    """
    cfg = family_for(hp.cfg["model_type"]).from_hf(hp.cfg)  # the window as velotune and transformers apply it
    w = cfg.sliding_window
    if w is None or w >= hp.n_ctx or not any(cfg.is_sliding(i) for i in range(cfg.num_layers)):
        return
    log.warning(
        f"{hp.cfg['model_type']}: sliding_window {w} is shorter than the context ({hp.n_ctx} tokens), but llama.cpp "
        f"runs {spec.name} GGUF files without a sliding window: the exported file gives this model's logits only "
        f"while prompt + output fit in {w} tokens, and other logits beyond. Run it with a context of at most {w} "
        f"(llama.cpp -c {w}, Ollama PARAMETER num_ctx {w}), or use the Hugging Face export for longer inputs."
    )


def _gemma_attention_keys(writer: GGUFWriter, hp: HParams, big_layers: int, pattern: int) -> None:
    """Sliding window and layer pattern shared by Gemma 2 and 3; ExportError for what llama.cpp cannot express.

    llama.cpp stores no attention scale for Gemma: it uses head_dim ** -0.5, or (hidden / heads) ** -0.5 for the
    27B models (`big_layers` blocks), so query_pre_attn_scalar must be that value.
    """
    cfg = hp.cfg
    expected = hp.n_embd // hp.n_head if hp.n_layer == big_layers else hp.head_dim
    scalar = float(cfg.get("query_pre_attn_scalar", 256))
    if scalar != expected:
        raise ExportError(
            f"{cfg['model_type']}: query_pre_attn_scalar {scalar:g} has no GGUF form; llama.cpp scales attention by "
            f"{expected} ** -0.5 for this shape ({'hidden / heads' if hp.n_layer == big_layers else 'head_dim'}). "
            "Keep the Hugging Face export of this model."
        )
    writer.add_sliding_window(int(cfg.get("sliding_window") or 4096))
    default = _sliding_layers(hp.n_layer, pattern)
    period = cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern")  # transformers 4.x
    types = cfg.get("layer_types")
    sliding = [t == "sliding_attention" for t in types] if types else _sliding_layers(hp.n_layer, period or pattern)
    if sliding != default:  # velotune's import reads the pattern; llama.cpp's gemma graphs hard-code theirs
        log.warning("%s: non-default sliding layers %s; llama.cpp may ignore them", cfg["model_type"], sliding)
        writer.add_sliding_window_pattern(sliding)


def _sliding_layers(n_layer: int, pattern: int) -> list[bool]:
    """True for sliding layers: every `pattern`-th layer is global (Hugging Face's and llama.cpp's rule)."""
    return [bool((i + 1) % pattern) for i in range(n_layer)]


def _gemma2_keys(writer: GGUFWriter, hp: HParams) -> None:
    """Gemma 2: soft-caps (Gemma2Config's defaults 50 / 30 when absent) and the sliding window."""
    _gemma_attention_keys(writer, hp, big_layers=46, pattern=2)
    for key, default, add in (
        ("attn_logit_softcapping", 50.0, writer.add_attn_logit_softcapping),
        ("final_logit_softcapping", 30.0, writer.add_final_logit_softcapping),
    ):
        value = hp.cfg.get(key, default)
        if value is not None:
            add(float(value))


def _gemma3_keys(writer: GGUFWriter, hp: HParams) -> None:
    """Gemma 3: the sliding layers' rope base (freq_base_swa), sliding window, optional final soft-cap."""
    _gemma_attention_keys(writer, hp, big_layers=62, pattern=6)
    local_type = hp.rope_local.get("rope_type", hp.rope_local.get("type", "default"))
    if local_type != "default" or hp.cfg.get("attn_logit_softcapping") is not None:
        raise ExportError(
            "gemma3_text: rope scaling on sliding layers or attn_logit_softcapping have no GGUF form in llama.cpp's "
            "gemma3; keep the Hugging Face export of this model"
        )
    writer.add_rope_freq_base_swa(float(hp.rope_local.get("rope_theta", 10000.0)))
    if hp.cfg.get("final_logit_softcapping") is not None:
        writer.add_final_logit_softcapping(float(hp.cfg["final_logit_softcapping"]))


_LONGROPE = ("longrope", "su")  # "su" is Phi-3's original name for it


def _phi3_orig_ctx(hp: HParams) -> int | None:
    value = hp.cfg.get("original_max_position_embeddings") or hp.rope.get("original_max_position_embeddings")
    return int(value) if value else None


def _phi3_keys(writer: GGUFWriter, hp: HParams) -> None:
    """Phi-3: sliding window, original context, and longrope's attention factor (factors are tensors)."""
    if hp.cfg.get("sliding_window"):
        writer.add_sliding_window(int(hp.cfg["sliding_window"]))
    orig = _phi3_orig_ctx(hp)
    if orig:
        writer.add_rope_scaling_orig_ctx_len(orig)
    if hp.rope_type in _LONGROPE:
        if not orig:
            raise ExportError("phi3: longrope needs original_max_position_embeddings in config.json")
        factor = hp.rope.get("attention_factor")
        if factor is None:  # transformers' and llama.cpp's default: grows with the context extension
            scale = hp.n_ctx / orig
            factor = 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(orig))
        writer.add_rope_scaling_attn_factors(float(factor))


FAMILIES: dict[str, ArchSpec] = {
    "llama": ArchSpec(MODEL_ARCH.LLAMA, permute_qk=True, llama3_rope_freqs=True),
    # llama.cpp runs Mistral 7B-style models as llama, without their sliding window (see `_warn_window_dropped`)
    "mistral": ArchSpec(MODEL_ARCH.LLAMA, permute_qk=True),
    "qwen2": ArchSpec(MODEL_ARCH.QWEN2),
    "qwen3": ArchSpec(MODEL_ARCH.QWEN3, head_dim_keys=True),
    "gemma2": ArchSpec(
        MODEL_ARCH.GEMMA2, head_dim_keys=True, norm_offset=1.0, sliding_window=True, extra_keys=_gemma2_keys
    ),
    "gemma3_text": ArchSpec(
        MODEL_ARCH.GEMMA3, head_dim_keys=True, norm_offset=1.0, sliding_window=True, extra_keys=_gemma3_keys
    ),
    "phi3": ArchSpec(MODEL_ARCH.PHI3, rope_types=_LONGROPE, extra_keys=_phi3_keys),
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


def rope_tensors(spec: ArchSpec, hp: HParams) -> dict[str, np.ndarray]:
    """Generated rope tensors by GGUF name: llama-3's rope_freqs, Phi-3's longrope factors (float32, (rope_dim/2,))."""
    if spec.llama3_rope_freqs:
        factors = llama3_rope_factors(hp)
        return {} if factors is None else {"rope_freqs.weight": factors}
    if "longrope" not in spec.rope_types or hp.rope_type not in _LONGROPE:
        return {}
    out = {}
    for kind in ("long", "short"):
        values = np.asarray(hp.rope.get(f"{kind}_factor") or [], dtype=np.float32)
        if values.shape != ((hp.rope_dim or hp.head_dim) // 2,):
            raise ExportError(
                f"longrope {kind}_factor has {values.size} values, expected rotated dims / 2 = "
                f"{(hp.rope_dim or hp.head_dim) // 2}; fix rope_scaling in config.json"
            )
        out[f"rope_factors_{kind}.weight"] = values
    return out


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
