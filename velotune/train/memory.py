"""Memory planner: peak GPU memory of a training step predicted from the model's shapes, before anything loads.

The prediction is what torch.cuda.max_memory_allocated() reports (the CUDA context and allocator slack come on top
and are handled by the "fits" check). Its parts, for T = micro-batch x sequence tokens, H hidden, I intermediate,
L layers, V vocabulary, and a = bytes per activation value (2 in bf16):

- weights: decoder linears at 2 bytes/param (bf16), NF4 ~0.52 (4 bits + double-quantized absmax), int8 and FP8 1
  (+ a float32 scale per row); embeddings, lm_head and norms stay 16-bit;
- trained parameters: LoRA A/B in fp32 (value, gradient, optimizer states); full/partial fine-tuning adds the
  gradient and optimizer states of the 16-bit weights (AdamW: 2 states in the parameter dtype; adamw_8bit ~2.03 bytes;
  adafactor: a row and a column vector per matrix; sgd: none);
- saved activations, per token and layer, what our decoder keeps for backward: the layer input, two norm outputs,
  q and k after rope, v, the attention output and its o_proj copy, the mid-layer residual, gate, up and the GLU
  output: 4H + 3 q_dim + 2 kv_dim + 3I values (2I when LoRA on gate, up and down runs as the fused MLP, which
  rebuilds the GLU output in backward). A tiled MLP (long sequences, models/decoder.resolve_mlp_tile) keeps only
  its input, already counted, and holds its intermediate values for one tile of tokens while that tile's backward
  runs. Without checkpointing all L layers keep them; with recompute only
  each layer's input (T x H) is kept, plus one layer's full set while it is recomputed; with offload the inputs live
  in host memory and only the layer being recomputed is on the GPU;
- backward working memory of one layer: the MLP's (tile or T) x 3I, 2H per token for the residual gradients,
  q_dim + 2 kv_dim per token for the attention's dq, dk, dv; rope tables; with NF4/int8, one linear's weight
  dequantized to 16 bits at a time;
- the loss: the decoder's chunked cross-entropy keeps one [chunk x V] logits buffer in the activation dtype (the
  gradient is written over it) of at most 512 MiB (kernels.cross_entropy.chunk_tokens), plus
  the final hidden states, their copy for target tokens and their gradient (3 x T x H); training lm_head adds its
  fp32 gradient (V x H x 4);
- packed or padded batches: document ids (B x T int32) and, on CUDA, FlexAttention's block mask (four int32
  tables of B x (T/128)^2); no [T x T] mask is built (models/decoder.document_masks).

`longest_seq_len` searches the sequence length over these predictions (`velotune plan --max_seq_length auto`).

These are estimates, written so each term can be checked against bench/bench_planner.py on a GPU.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from velotune.errors import ConfigError
from velotune.kernels.cross_entropy import chunk_tokens
from velotune.models.checkpointing import checkpointed_layers
from velotune.models.config import ModelConfig
from velotune.models.decoder import resolve_mlp_tile
from velotune.train.config import RunConfig

GiB = 2**30
MiB = 2**20
CUDA_CONTEXT = 1 * GiB  # CUDA context, cuBLAS workspace: on the device, not in max_memory_allocated
FRAGMENTATION = 0.95  # share of the rest the caching allocator can hand out in practice
# Memory each card reports (nvidia-smi MiB); names as `--gpu` accepts them.
GPUS: dict[str, int] = {
    "T4": 15360 * MiB,
    "RTX4090": 24564 * MiB,
    "A100-40GB": 40960 * MiB,
    "A100-80GB": 81920 * MiB,
    "H100": 81559 * MiB,
    "H200": 143771 * MiB,
}
QUANT_BYTES = {None: None, "nf4": 0.5 + 1 / 64 + 4 / (64 * 256), "int8": 1.0, "fp8": 1.0}  # per weight; None: 16-bit
ROW_SCALE_BYTES = {"int8": 4, "fp8": 4}  # float32 scale per output row (SCB; FP8's per-channel weight_scale_inv)
CHECKPOINTING = {None: "none", "checkpoint": "recompute", "offload": "offload"}
# Relative cost per token, for ranking settings that fit: recompute adds a forward (4/3); offload a little more;
# 4-bit dequantizes weights on the fly; short micro-batches leave the GPU partly idle.
COMPUTE_COST = {None: 1.0, "checkpoint": 4 / 3, "offload": 4 / 3 * 1.05}
QUANT_COST = {None: 1.0, "nf4": 1.1, "int8": 1.1, "fp8": 1.0}  # fp8: unmeasured; FP8 matmuls, quantized inputs
HALF_UTILISATION_TOKENS = 512
CHECKPOINT_FRACTIONS = (1.0, 0.75, 0.5, 0.4, 0.3, 0.2, 0.1)  # gradient_checkpointing_layers the planner tries


@dataclass(frozen=True)
class Setting:
    """What a training step's memory depends on besides the model."""

    micro_batch: int = 1
    seq_len: int = 2048
    checkpointing: str | None = "checkpoint"  # None | "checkpoint" (recompute) | "offload"
    checkpoint_layers: float = 1.0  # fraction of layers checkpointed; the others keep all their activations
    quantization: str | None = None  # None | "nf4" | "int8" | "fp8"
    finetuning: str = "lora"  # lora | full | partial
    lora_r: int = 16
    dora: bool = False  # DoRA keeps each projection's unscaled output for its magnitude's gradient
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    train_layers: int = 0  # partial: top layers trained
    optim: str = "adamw_torch"
    param_bytes: int = 2  # bf16 weights and activations
    masked: bool = False  # padded or packed batches: attention takes document ids and a block mask
    mlp_tile_tokens: int | str | None = "auto"  # CausalLM.mlp_tile_tokens: tokens per MLP tile

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len

    @property
    def mlp_tokens(self) -> int:
        """Tokens whose MLP intermediates exist at once: one tile, or the whole micro-batch untiled."""
        return resolve_mlp_tile(self.mlp_tile_tokens, self.tokens) or self.tokens


@dataclass
class Estimate:
    setting: Setting
    parts: dict[str, int] = field(default_factory=dict)  # what -> bytes

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def table(self) -> str:
        width = max(len(k) for k in self.parts)
        lines = [f"  {k:<{width}}  {v / GiB:7.2f} GiB" for k, v in self.parts.items()]
        return "\n".join(lines + [f"  {'predicted peak':<{width}}  {self.total / GiB:7.2f} GiB"])


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each projection of one decoder layer."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def _norms_per_layer(cfg: ModelConfig) -> int:
    return cfg.hidden_size * (4 if cfg.sandwich_norm else 2) + (2 * cfg.head_dim if cfg.qk_norm else 0)


def count_parameters(cfg: ModelConfig) -> int:
    per_layer = sum(a * b for a, b in linear_shapes(cfg).values()) + _norms_per_layer(cfg)
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    return cfg.num_layers * per_layer + cfg.vocab_size * cfg.hidden_size + head + cfg.hidden_size


def _weights(cfg: ModelConfig, s: Setting) -> int:
    per_weight = QUANT_BYTES[s.quantization] or s.param_bytes
    linears = sum(
        a * b * per_weight + ROW_SCALE_BYTES.get(s.quantization, 0) * b for a, b in linear_shapes(cfg).values()
    )
    vh = cfg.vocab_size * cfg.hidden_size
    rest = _norms_per_layer(cfg) * cfg.num_layers + cfg.hidden_size + vh * (1 if cfg.tie_word_embeddings else 2)
    return int(cfg.num_layers * linears + rest * s.param_bytes)


def trained_matrices(cfg: ModelConfig, s: Setting) -> list[tuple[int, int, int]]:
    """(rows, cols, bytes per value) of every trained parameter (vectors as rows x 1)."""
    shapes = linear_shapes(cfg)
    if s.finetuning == "lora":
        per_layer = [
            m for t in s.lora_targets if t in shapes for m in ((s.lora_r, shapes[t][0]), (shapes[t][1], s.lora_r))
        ]
        return [(r, c, 4) for r, c in per_layer * cfg.num_layers]
    layer = [(b, a, s.param_bytes) for a, b in shapes.values()] + [(_norms_per_layer(cfg), 1, s.param_bytes)]
    n_layers = cfg.num_layers if s.finetuning == "full" else min(s.train_layers, cfg.num_layers)
    out = layer * n_layers + [(cfg.hidden_size, 1, s.param_bytes), (cfg.vocab_size, cfg.hidden_size, s.param_bytes)]
    if s.finetuning == "full" and not cfg.tie_word_embeddings:
        out.append((cfg.vocab_size, cfg.hidden_size, s.param_bytes))  # embeddings besides lm_head
    return out


def _optimizer_bytes(rows: int, cols: int, value_bytes: int, optim: str) -> float:
    n = rows * cols
    if optim in ("adamw_torch", "adamw_torch_fused"):
        return 2 * n * value_bytes
    if optim == "adamw_8bit":
        return n * (2 + 8 / 256) if n >= 4096 else 8 * n
    if optim == "adafactor":
        return 4 * (rows + cols) if cols > 1 else 4 * n
    return 0.0


def _trained(cfg: ModelConfig, s: Setting) -> tuple[int, int]:
    """(bytes of trained values and gradients, bytes of optimizer states)."""
    mats = trained_matrices(cfg, s)
    values = sum(r * c * b for r, c, b in mats) if s.finetuning == "lora" else 0  # 16-bit weights counted already
    grads = sum(r * c * b for r, c, b in mats)
    states = sum(_optimizer_bytes(r, c, b, s.optim) for r, c, b in mats)
    return int(values + grads), int(states)


def layer_activation_values(cfg: ModelConfig, s: Setting) -> int:
    """Values per token one decoder layer keeps for backward (untiled MLP)."""
    return _attention_activation_values(cfg, s) + _mlp_activation_values(cfg, s)


def _attention_activation_values(cfg: ModelConfig, s: Setting) -> int:
    """Values per token a layer keeps outside the MLP's intermediates (the MLP input among them)."""
    h = cfg.hidden_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    sandwich = 2 * h if cfg.sandwich_norm else 0
    lora = s.lora_r * len(s.lora_targets) if s.finetuning == "lora" else 0
    return 4 * h + 3 * q + 2 * kv + sandwich + lora + _dora_activation_values(cfg, s)


def _dora_activation_values(cfg: ModelConfig, s: Setting) -> int:
    """DoRA's extra values per token: z [N, out] of each targeted projection, except gate and up inside the fused
    MLP, whose kept outputs serve as z already."""
    if not (s.dora and s.finetuning == "lora"):
        return 0
    fused = {"gate_proj", "up_proj", "down_proj"} <= set(s.lora_targets)
    shapes = linear_shapes(cfg)
    return sum(shapes[t][1] for t in s.lora_targets if t in shapes and not (fused and t in ("gate_proj", "up_proj")))


def _mlp_activation_values(cfg: ModelConfig, s: Setting) -> int:
    # LoRA on gate, up and down runs as one fused MLP Function that keeps gate and up and rebuilds the down input
    fused_mlp = s.finetuning == "lora" and {"gate_proj", "up_proj", "down_proj"} <= set(s.lora_targets)
    return (2 if fused_mlp else 3) * cfg.intermediate_size


def estimate(cfg: ModelConfig, s: Setting) -> Estimate:
    """Predicted peak allocated GPU memory of one training step, by part."""
    a, t, h = s.param_bytes, s.tokens, cfg.hidden_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    tiled = s.mlp_tokens < t  # a tiled MLP keeps its intermediates for one tile, during that tile's backward
    mlp_saved = 0 if tiled else t * _mlp_activation_values(cfg, s) * a
    layer = t * _attention_activation_values(cfg, s) * a + mlp_saved
    n_ckpt = sum(checkpointed_layers(cfg.num_layers, s.checkpoint_layers))
    kept = (cfg.num_layers - n_ckpt) * layer  # layers outside checkpointing keep everything
    saved = {None: cfg.num_layers * layer, "checkpoint": n_ckpt * t * h * a + kept, "offload": t * h * a + kept}
    recompute = 0 if s.checkpointing is None else layer
    working = s.mlp_tokens * 3 * cfg.intermediate_size * a + t * (2 * h + q + 2 * kv) * a + t * cfg.head_dim * a * 2
    working += s.mlp_tokens * _mlp_activation_values(cfg, s) * a if tiled else 0
    if s.quantization:
        working += max(x * y for x, y in linear_shapes(cfg).values()) * a
    head_trains = s.finetuning != "lora"
    loss = min(t, chunk_tokens(cfg.vocab_size, a)) * cfg.vocab_size * a + 3 * t * h * a
    loss += cfg.vocab_size * h * 4 if head_trains else 0
    values, states = _trained(cfg, s)
    weights_label = {
        None: "weights (16-bit)",
        "nf4": "weights (NF4 decoder, 16-bit embeddings)",
        "fp8": "weights (FP8 decoder, 16-bit embeddings)",
    }
    label = f"saved activations ({CHECKPOINTING[s.checkpointing]})"
    parts = {
        weights_label.get(s.quantization, "weights (int8 decoder, 16-bit embeddings)"): _weights(cfg, s),
        "trained parameters and gradients": values,
        f"optimizer states ({s.optim})": states,
        label: saved[s.checkpointing],
        "attention masks (document ids, block mask)": _document_mask_bytes(s) if s.masked else 0,
        "peak of: loss / layer backward": max(loss, recompute + working),
    }
    return Estimate(s, parts)


def _document_mask_bytes(s: Setting) -> int:
    """Document ids [B, T] int32 and FlexAttention's block mask: 4 tables of [B, 1, T/128, T/128] int32."""
    blocks = -(-s.seq_len // 128)
    return 4 * s.tokens + 4 * 4 * s.micro_batch * blocks * blocks


def longest_seq_len(cfg: ModelConfig, s: Setting, capacity: int, multiple: int = 1024, limit: int = 2**22) -> int:
    """The longest sequence (a multiple of `multiple`, at most `limit`) whose predicted peak fits `capacity` bytes
    with the rest of setting `s`; 0 when not even `multiple` tokens fit. The prediction grows with the length except
    where the MLP starts tiling, so each side of that switch is searched on its own."""
    usable, top = usable_bytes(capacity), limit // multiple

    def fits(steps: int) -> bool:
        return estimate(cfg, replace(s, seq_len=steps * multiple)).total <= usable

    def tiled(steps: int) -> bool:
        trial = replace(s, seq_len=steps * multiple)
        return trial.mlp_tokens < trial.tokens

    switch = next((n for n in range(1, top + 1) if tiled(n)), None)
    ranges = [(1, top)] if switch is None else [(switch, top), (1, switch - 1)]
    for lo, hi in ranges:
        if lo > hi or not fits(lo):
            continue
        while lo < hi:  # largest n in [lo, hi] that fits, fits(lo) holding
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return lo * multiple
    return 0


def usable_bytes(capacity: int) -> int:
    return int((capacity - CUDA_CONTEXT) * FRAGMENTATION)


def relative_cost(s: Setting) -> float:
    """Time per token relative to a saturated 16-bit step without recompute (for ranking only)."""
    utilisation = s.tokens / (s.tokens + HALF_UTILISATION_TOKENS)
    recompute = COMPUTE_COST[s.checkpointing] - 1.0
    layers = s.checkpoint_layers if s.checkpointing else 1.0
    return (1.0 + recompute * layers) * QUANT_COST[s.quantization] / utilisation


@dataclass
class Recommendation:
    setting: Setting
    accumulation: int
    estimate: Estimate

    def describe(self) -> str:
        s = self.setting
        quant = {
            None: "16-bit",
            "nf4": "4-bit (load_in_4bit)",
            "int8": "8-bit (load_in_8bit)",
            "fp8": "FP8 (load_in_fp8)",
        }[s.quantization]
        layers = f" ({s.checkpoint_layers:g} of layers)" if s.checkpointing and s.checkpoint_layers < 1 else ""
        return (
            f"micro-batch {s.micro_batch}, gradient_accumulation_steps {self.accumulation}, gradient_checkpointing "
            f"{CHECKPOINTING[s.checkpointing]}{layers}, {quant} weights: predicted {self.estimate.total / GiB:.1f} GiB"
        )

    def overrides(self) -> str:
        s = self.setting
        gc = {None: "false", "checkpoint": "true", "offload": "offload"}[s.checkpointing]
        out = (
            f"--per_device_train_batch_size {s.micro_batch} --gradient_accumulation_steps {self.accumulation} "
            f"--gradient_checkpointing {gc}"
        )
        if s.checkpointing and s.checkpoint_layers < 1:
            out += f" --gradient_checkpointing_layers {s.checkpoint_layers:g}"
        return out + (" --load_in_4bit true" if s.quantization == "nf4" else "")


def recommend(cfg: ModelConfig, s: Setting, effective_batch: int, capacity: int) -> Recommendation | None:
    """The fastest setting (micro-batch, accumulation, checkpointing and the fraction of layers it covers, 4-bit or
    not) that fits in `capacity` bytes, keeping the effective batch; None when nothing fits."""
    quants = [s.quantization] if s.finetuning != "lora" or s.quantization else [None, "nf4"]
    sizes = sorted({2**k for k in range(int(math.log2(max(1, effective_batch))) + 1)} | {effective_batch})
    best: Recommendation | None = None
    for quant in quants:
        for policy in COMPUTE_COST:
            for mb, layers in itertools.product(sizes, CHECKPOINT_FRACTIONS if policy else (1.0,)):
                trial = replace(s, micro_batch=mb, checkpointing=policy, checkpoint_layers=layers, quantization=quant)
                est = estimate(cfg, trial)
                if est.total > usable_bytes(capacity):
                    continue
                option = Recommendation(trial, math.ceil(effective_batch / mb), est)
                if best is None or relative_cost(trial) < relative_cost(best.setting):
                    best = option
    return best


def parse_gpu(text: str) -> tuple[str, int]:
    """(name, bytes) for a known card name (T4, RTX4090, A100-40GB, A100-80GB, H100, H200) or a size (24GB, 80GiB)."""
    names = {k.lower().replace("-", ""): k for k in GPUS}
    key = text.lower().replace("-", "").replace(" ", "")
    if key in names:
        return names[key], GPUS[names[key]]
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(gb|gib|g)", key)
    if m:
        return f"{m.group(1)} GB", int(float(m.group(1)) * (GiB if m.group(2) == "gib" else 1e9))
    raise ConfigError(f"--gpu {text!r}: expected a size such as 24GB or one of: {', '.join(GPUS)}")


def read_model_config(source: str | None) -> tuple[ModelConfig, str]:
    """(ModelConfig, where it was read) from config.json or GGUF metadata alone: no weights are read."""
    from velotune.models.families import family_for, family_for_gguf
    from velotune.models.load import default_model_path, read_hf_config, text_model_config

    path = default_model_path() if source is None else Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        from velotune.models.gguf_import import open_gguf, read_metadata

        arch, meta = read_metadata(open_gguf(path))
        spec = family_for_gguf(arch)
        assert spec.from_gguf is not None
        return spec.from_gguf(meta), str(path)
    if path.is_dir():
        hf = read_hf_config(path)
    elif source is not None and source.count("/") == 1 and not source.startswith((".", "/", "~")):
        hf = _hub_config(source)
    else:
        raise ConfigError(f"model {source!r}: expected a Hugging Face directory, a .gguf file or a hub id")
    if "model_type" not in hf:
        raise ConfigError(f"{source}: config.json has no model_type")
    hf = text_model_config(hf)
    return family_for(hf["model_type"]).from_hf(hf), str(source)


def _hub_config(repo_id: str) -> dict:
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(repo_id, "config.json")).read_text())
    except (ImportError, OSError, ValueError) as exc:
        raise ConfigError(
            f"could not read config.json of {repo_id!r} from the Hugging Face hub ({type(exc).__name__}: {exc}); "
            "pass a local model directory"
        ) from exc


def layers_trained(train_layers: float, num_layers: int) -> int:
    """finetuning partial: train_layers as a count (>= 1) or a fraction (< 1) of num_layers, at least 1."""
    n = int(train_layers) if train_layers >= 1 else max(1, round(train_layers * num_layers))
    if n > num_layers:
        raise ConfigError(f"train_layers: {n}, but the model has {num_layers} decoder layers; use at most that")
    return n


def checkpoint_layers_that_fit(cfg: ModelConfig, s: Setting, capacity: int) -> float:
    """The smallest fraction of checkpointed layers (the least recompute) whose predicted peak fits `capacity`
    bytes; 1.0 when none does."""
    for layers in sorted(CHECKPOINT_FRACTIONS):
        if estimate(cfg, replace(s, checkpoint_layers=layers)).total <= usable_bytes(capacity):
            return layers
    return 1.0


def resolve_checkpoint_layers(run: RunConfig, model: ModelConfig, device: torch.device) -> tuple[float, str]:
    """gradient_checkpointing_layers as a fraction, and for `auto` a line saying what the planner chose for this
    GPU (the whole-model plan: conservative under FSDP; on CPU every layer is checkpointed)."""
    value = run.train.gradient_checkpointing_layers
    if value != "auto":
        return float(value), ""
    if not run.train.gradient_checkpointing or device.type != "cuda":
        return 1.0, ""
    capacity = torch.cuda.get_device_properties(device).total_memory
    setting = setting_for(run, model)
    layers = checkpoint_layers_that_fit(model, setting, capacity)
    total = estimate(model, replace(setting, checkpoint_layers=layers)).total
    return layers, (
        f"gradient_checkpointing_layers auto: {layers:g} of the layers recomputed (predicted peak {total / GiB:.1f} "
        f"of {capacity / GiB:.1f} GiB)"
    )


def setting_for(run: RunConfig, model: ModelConfig) -> Setting:
    """The Setting a run config trains with (16-bit activations unless dtype is float32)."""
    t = run.train
    gc = t.gradient_checkpointing
    return Setting(
        micro_batch=t.per_device_train_batch_size,
        seq_len=run.data.max_seq_length,
        checkpointing=None if not gc else "offload" if gc == "offload" else "checkpoint",
        checkpoint_layers=1.0 if t.gradient_checkpointing_layers == "auto" else t.gradient_checkpointing_layers,
        quantization=t.quantization,
        finetuning=t.finetuning,
        lora_r=run.lora.r,
        dora=run.lora.use_dora,
        lora_targets=tuple(run.lora.target_modules),
        train_layers=layers_trained(t.train_layers, model.num_layers) if t.finetuning == "partial" else 0,
        optim=t.optim,
        param_bytes=4 if t.dtype == "float32" else 2,
        masked=t.per_device_train_batch_size > 1 or run.data.packing,
    )
