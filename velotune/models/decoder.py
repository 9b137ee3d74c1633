"""The one decoder: Llama, Qwen2/3, Mistral, Gemma 2/3 and Phi-3 are configurations of these modules.

Module and parameter names follow Hugging Face's (model.layers.N.self_attn.q_proj.weight ...), so safetensors
checkpoints load without renaming and LoRA targets keep the names users know. Every op that a fused kernel
replaces is called through velotune.kernels, never inlined here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from velotune.kernels.attention import Documents, attention, document_attention
from velotune.kernels.cross_entropy import IGNORE_INDEX, linear_cross_entropy, linear_token_logps
from velotune.kernels.glu import GATED_ACTIVATIONS
from velotune.kernels.lora import lora_mlp, project_for_backward
from velotune.kernels.rms_norm import rms_norm
from velotune.kernels.rope import apply_rope
from velotune.models.checkpointing import checkpointed_layers, run_layer, run_tiled
from velotune.models.config import ModelConfig
from velotune.models.frozen import FrozenQuantLinear
from velotune.models.rope import attention_factor, rope_buffer_name, rope_buffers, rope_tables


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim) if offset == 0 else torch.zeros(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.offset)


class KVCache:
    """Keys and values of the tokens seen so far, one (k, v) pair per layer, for generation."""

    def __init__(self, num_layers: int) -> None:
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers

    @property
    def length(self) -> int:
        first = self.layers[0]
        return 0 if first is None else first[0].shape[2]

    def update(self, idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        prev = self.layers[idx]
        if prev is not None:
            k, v = torch.cat((prev[0], k), dim=2), torch.cat((prev[1], v), dim=2)
        self.layers[idx] = (k, v)
        return k, v


class StaticKVCache:
    """Keys and values preallocated for a whole generation request, [B, Hk, max_len, D] per layer, written in place.

    `filled` [B, max_len] is False on left-padding slots. Every row advances by the same number of slots per forward,
    so the write position is one host integer (`length`, advanced when the last layer has written) and the masks
    are built without reading a tensor back. With `slot` set (a device tensor: CUDA-graph decoding) a one-token
    forward writes at that slot and attends to the first `attend` slots, so one captured graph serves many steps.
    """

    def __init__(
        self, keys: list[torch.Tensor], values: list[torch.Tensor], filled: torch.Tensor, padded: bool
    ) -> None:
        self.keys, self.values, self.filled = keys, values, filled
        self.padded = padded  # some slot before `length` is padding: the forward needs masks
        self.length = 0
        self.slot: torch.Tensor | None = None
        self.attend = 0

    @classmethod
    def allocate(
        cls, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device
    ) -> StaticKVCache:
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        return cls(keys, values, torch.ones(batch, max_len, dtype=torch.bool, device=device), padded=False)

    @property
    def max_len(self) -> int:
        return self.filled.shape[1]

    def rows(self, index: slice) -> StaticKVCache:
        """A view of some rows (a prefill chunk); what it writes lands in this cache."""
        view = StaticKVCache(
            [k[index] for k in self.keys], [v[index] for v in self.values], self.filled[index], self.padded
        )
        view.length = self.length
        return view

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` [R'] (in that order), one layer at a time: finished rows stop costing work."""
        for i in range(len(self.keys)):
            self.keys[i], self.values[i] = self.keys[i][rows], self.values[i][rows]
        self.filled = self.filled[rows]

    def update(self, idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = k.shape[2]
        if self.slot is not None:
            self.keys[idx].index_copy_(2, self.slot, k)
            self.values[idx].index_copy_(2, self.slot, v)
            end = self.attend
        else:
            s = self.length
            self.keys[idx][:, :, s : s + t] = k
            self.values[idx][:, :, s : s + t] = v
            end = s + t
        if idx == len(self.keys) - 1:
            self.length += t
        return self.keys[idx][:, :, :end], self.values[idx][:, :, :end]

    def masks(self, cfg: ModelConfig, position_ids: torch.Tensor, q_len: int) -> AttentionMasks:
        """This forward's masks from `filled` and host positions (or the device slot), without a host sync."""
        if self.slot is None:
            k_len = self.length + q_len
            mask = self.filled[:, :k_len] if self.padded else None
            return build_masks(cfg, position_ids, mask, q_len, k_len, given_positions=False, padded=self.padded)
        ki = torch.arange(self.attend, device=self.filled.device)  # [K] slot of each key
        full = self.filled[:, : self.attend] & (ki <= self.slot)  # [B, K] written slots up to the query's
        sliding = full & (ki > self.slot - cfg.sliding_window) if cfg.sliding_window else None
        return AttentionMasks(full[:, None, None], None if sliding is None else sliding[:, None, None], causal=False)


# The linear layers of every decoder layer, by the names checkpoints, LoRA targets and quantization use.
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class AttentionMasks:
    """Per-forward masks. A full-sequence forward carries `documents` (packed documents / padding segments, None =
    one per row) and the sliding `window` and never a [T x T] tensor; KV-cache steps carry boolean `full` for
    global layers and `sliding` for sliding-window layers ([B, 1, Tq, Tk], None = plain causal)."""

    full: torch.Tensor | None
    sliding: torch.Tensor | None
    causal: bool
    documents: Documents | None = None
    window: int | None = None

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sliding: bool, scale: float, softcap: float | None
    ) -> torch.Tensor:
        """Attention of q [B, Hq, Tq, D] over k/v [B, Hk, Tk, D] for a global (sliding=False) or sliding layer."""
        window = self.window if sliding else None
        packed = self.documents is not None and self.documents.ids is not None
        if packed or window is not None:
            return document_attention(q, k, v, self.documents, window, scale, softcap)
        mask = self.sliding if sliding else self.full
        return attention(q, k, v, mask, self.causal and mask is None, scale, softcap)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        hd, h = cfg.head_dim, cfg.hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim, self.layer = cfg.num_heads, cfg.num_kv_heads, hd, layer
        self.q_proj = nn.Linear(h, cfg.num_heads * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * hd, h, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, cfg.norm_offset)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, cfg.norm_offset)
        self.qk_norm = cfg.qk_norm
        self.scale = (cfg.query_pre_attn_scalar or hd) ** -0.5
        self.softcap = cfg.attn_logit_softcap
        self.sliding = cfg.is_sliding(layer)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        masks: AttentionMasks,
        cache: KVCache | StaticKVCache | None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # [B, Hq, T, D]
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hk, T, D]
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        out = masks.attend(q, k, v, self.sliding, self.scale, self.softcap)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=cfg.mlp_bias)
        self.act = GATED_ACTIVATIONS[cfg.activation]
        self.activation = cfg.activation

    def forward(self, x: torch.Tensor, need_output: bool = True, tile: int | None = None) -> torch.Tensor:
        """need_output=False (a checkpointed layer's recomputation, whose output is discarded) keeps only what the
        down projection's backward needs and returns a placeholder of the output's shape.

        With LoRA on all three projections (and no dropout) the MLP is one fused Function (kernels.lora.lora_mlp),
        which keeps x, gate and up for backward instead of also the down projection's input. With `tile` (tokens)
        the sequence goes through a tile at a time, forward and backward (checkpointing.run_tiled): [N x I] tensors
        exist for one tile, x alone is kept, and backward recomputes the MLP."""
        return run_tiled(self._untiled, x, tile, need_output)

    def _untiled(self, x: torch.Tensor, need_output: bool = True) -> torch.Tensor:
        fused = self._lora_weights(x.dtype)
        if fused is not None:
            return lora_mlp(x, *fused, activation=self.activation, need_output=need_output)
        h = self.act(self.gate_proj(x), self.up_proj(x))
        return self.down_proj(h) if need_output else project_for_backward(self.down_proj, h)

    def _lora_weights(self, dtype: torch.dtype) -> tuple | None:
        if not torch.is_grad_enabled():
            return None
        parts = [getattr(p, "lora_weights", None) for p in (self.gate_proj, self.up_proj, self.down_proj)]
        if any(part is None for part in parts):
            return None
        weights = tuple(part(dtype) for part in parts)
        return None if any(w is None for w in weights) else weights


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        eps, off = cfg.rms_norm_eps, cfg.norm_offset
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps, off)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps, off)
        self.mlp = MLP(cfg)
        self.sandwich = cfg.sandwich_norm
        self.residual_scale = cfg.residual_scale
        if self.sandwich:  # Gemma: post_attention_layernorm closes attention; these two wrap the MLP
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, off)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, off)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        masks: AttentionMasks,
        cache: KVCache | StaticKVCache | None,
        mlp_tile: int | None = None,
        need_output: bool = True,
    ) -> torch.Tensor:
        """need_output=False: the output's value is not needed, only its graph (checkpoint recomputation).
        mlp_tile: tokens per MLP tile (None: the whole sequence at once)."""
        h = self.self_attn(self.input_layernorm(x), rope, masks, cache)
        if self.sandwich:  # the post-feedforward norm's backward needs the real MLP output
            x = x + self._scaled(self.post_attention_layernorm(h))
            h = self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x), tile=mlp_tile))
            return x + self._scaled(h)
        x = x + self._scaled(h)
        return x + self._scaled(self.mlp(self.post_attention_layernorm(x), need_output, mlp_tile))

    def _scaled(self, h: torch.Tensor) -> torch.Tensor:
        """A sublayer's output as it joins the residual stream."""
        return h * self.residual_scale if self.residual_scale != 1.0 else h


class DecoderModel(nn.Module):
    """Embeddings, decoder layers and the final norm (Hugging Face's `model.` prefix)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)


@dataclass
class CausalLMOutput:
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    num_targets: torch.Tensor | None = None  # target tokens in this batch (after the shift)
    # with return_logps: log p(target) fp32 [B, T-1] (0 where there is no target), its row sums [B] and counts [B]
    token_logps: torch.Tensor | None = None
    logps: torch.Tensor | None = None
    num_targets_per_row: torch.Tensor | None = None

    def __getitem__(self, key: str | int) -> torch.Tensor | None:
        if isinstance(key, str):
            return getattr(self, key)
        return tuple(v for v in (self.loss, self.logits) if v is not None)[key]


def build_masks(
    cfg: ModelConfig,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    q_len: int,
    k_len: int,
    given_positions: bool = True,
    padded: bool | None = None,
) -> AttentionMasks:
    """Boolean masks [B, 1, Tq, Tk] for a KV-cache forward, or None where plain causal attention (the fast path) is
    exact (full-sequence forwards take document_masks).

    Packed sequences are recognised by position ids that restart at 0; padding by zeros in attention_mask (or by
    `padded`, when the caller knows, saving a host sync); sliding layers need a mask only when the sequence is longer
    than the window.
    """
    if padded is None:
        padded = attention_mask is not None and not bool(attention_mask.all())
    packed = given_positions and q_len == k_len and q_len > 1 and bool((position_ids[:, 1:] == 0).any())
    window = cfg.sliding_window if cfg.sliding_window and k_len > cfg.sliding_window else None
    if q_len == 1 and not padded and window is None:
        return AttentionMasks(None, None, causal=False)
    if not (padded or packed or window):
        return AttentionMasks(None, None, causal=True)
    dev = position_ids.device
    qi = torch.arange(k_len - q_len, k_len, device=dev)[:, None]  # [Tq, 1] absolute index of each query
    ki = torch.arange(k_len, device=dev)[None, :]  # [1, Tk]
    base = (ki <= qi)[None, None]  # [1, 1, Tq, Tk]
    if packed:
        doc = torch.cumsum(position_ids == 0, dim=-1)  # [B, T]
        base = base & (doc[:, None, :, None] == doc[:, None, None, :])
    if padded:
        base = base & attention_mask[:, None, None, :k_len].bool()
    diag = ki == qi  # a query always sees itself, so fully padded rows stay finite
    full = base | diag
    sliding = None
    if cfg.sliding_window:
        sliding = (base & (qi - ki < cfg.sliding_window)) | diag if window else full
    return AttentionMasks(full.expand(position_ids.shape[0], -1, -1, -1), sliding, causal=False)


def document_masks(
    cfg: ModelConfig, position_ids: torch.Tensor, attention_mask: torch.Tensor | None, given_positions: bool = True
) -> AttentionMasks:
    """Masks of a full-sequence forward (no KV cache) as document ids, never a [T x T] tensor.

    A document starts where position ids restart at 0 (packing) and where attention_mask switches between padding
    and tokens, so left or right padding is a document of its own that real tokens never see (padding inside a
    row would split the row there). One host sync tells whether any row holds more than one document.
    """
    b, t = position_ids.shape
    window = cfg.sliding_window if cfg.sliding_window and t > cfg.sliding_window else None
    starts = (position_ids == 0) if given_positions else None  # [B, T]
    if attention_mask is not None:
        m = attention_mask.bool()
        edge = torch.zeros_like(m)
        edge[:, 1:] = m[:, 1:] != m[:, :-1]
        starts = edge if starts is None else starts | edge
    docs = Documents(None, b, t) if window else None  # one document per row: holds the windowed block mask
    if starts is not None and t > 1 and bool(starts[:, 1:].any()):
        docs = Documents(torch.cumsum(starts, dim=1, dtype=torch.int32), b, t)  # [B, T]
    return AttentionMasks(None, None, causal=t > 1, documents=docs, window=window)


MLP_AUTO_TILE = 8192  # tokens per MLP tile under mlp_tile_tokens "auto": [8192 x 14336] bf16 is 224 MiB (Llama-8B)


def resolve_mlp_tile(setting: int | str | None, tokens: int) -> int | None:
    """Tokens per MLP tile for `tokens` tokens under mlp_tile_tokens `setting` (an int, "auto" or None)."""
    if setting == "auto":
        return MLP_AUTO_TILE if tokens >= 2 * MLP_AUTO_TILE else None
    if setting is None or tokens <= setting:
        return None
    return int(setting)


def shifted_targets(labels: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token targets [B, T-1] for labels [B, T]; a token starting a packed example (position 0) is no target."""
    targets = labels[:, 1:]
    if position_ids is not None:
        targets = targets.masked_fill(position_ids[:, 1:] == 0, IGNORE_INDEX)
    return targets


def count_targets(labels: torch.Tensor, position_ids: torch.Tensor | None = None) -> int:
    """Tokens that carry loss in a batch: the normaliser of the loss across accumulated micro-batches."""
    return int((shifted_targets(labels, position_ids) != IGNORE_INDEX).sum())


class CausalLM(nn.Module):
    """Decoder + LM head. forward() returns the loss without materialising logits when labels are given."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing: bool | str = False  # False | True (recompute) | "offload" (+ inputs on host)
        self.checkpoint_layers = 1.0  # fraction of layers checkpointed (spread evenly); the rest keep activations
        self.mlp_tile_tokens: int | str | None = "auto"  # MLP tile (tokens), None: untiled; see mlp_tile()
        # what a loaded model carries, set by the loader, the quantizer and lora.apply
        self.source: str | None = None  # the checkpoint it was loaded from
        self.quantization: str | None = None  # the base's storage: "nf4" | "int8" | "fp8" | None (16/32-bit)
        self.lora_config: Any = None  # lora.apply.LoRAConfig once adapters are attached (None: none)
        for name, inv_freq in rope_buffers(cfg).items():  # inv_freq (+ inv_freq_local, inv_freq_long)
            self.register_buffer(name, inv_freq, persistent=False)
        self.rope_scale = {local: attention_factor(cfg, local) for local in (False, True)}  # yarn/longrope

    @property
    def checkpoint_mode(self) -> str | None:
        """The activation-checkpointing policy in force: None, "checkpoint" or "offload"."""
        gc = self.gradient_checkpointing
        return None if not gc else "offload" if gc == "offload" else "checkpoint"

    def mlp_tile(self, tokens: int) -> int | None:
        """Tokens per MLP tile for a forward of `tokens` tokens: mlp_tile_tokens, or for "auto" MLP_AUTO_TILE when
        the forward holds at least two tiles (long sequences); None when the MLP runs untiled."""
        return resolve_mlp_tile(self.mlp_tile_tokens, tokens)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _rope(self, position_ids: torch.Tensor, dtype: torch.dtype, layer: DecoderLayer, tables: dict) -> tuple:
        local = layer.self_attn.sliding and self.config.rope_local_theta is not None
        if local not in tables:
            inv_freq = getattr(self, rope_buffer_name(self.config, position_ids, local))
            tables[local] = rope_tables(inv_freq, position_ids, dtype, self.rope_scale[local])
        return tables[local]

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | StaticKVCache | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states [B, T, H] for input_ids [B, T]."""
        b, t = input_ids.shape
        past = cache.length if cache is not None else 0
        given_positions = position_ids is not None  # default positions are never packed: no host sync to check
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=input_ids.device).expand(b, t)
        x = self.model.embed_tokens(input_ids)  # [B, T, H]
        if self.config.embedding_scale is not None:
            x = x * torch.tensor(self.config.embedding_scale, dtype=x.dtype)
        if isinstance(cache, StaticKVCache):
            masks = cache.masks(self.config, position_ids, t)
        elif cache is None:
            masks = document_masks(self.config, position_ids, attention_mask, given_positions)
        else:
            masks = build_masks(self.config, position_ids, attention_mask, t, past + t, given_positions)
        tables: dict = {}
        mode = self.checkpoint_mode if self.training and torch.is_grad_enabled() else None
        which = checkpointed_layers(len(self.model.layers), self.checkpoint_layers) if mode else []
        first = True
        tile = self.mlp_tile(b * t)
        for i, layer in enumerate(self.model.layers):
            rope = self._rope(position_ids, x.dtype, layer, tables)
            layer_mode = mode if mode and which[i] else None
            x = run_layer(layer, x, rope, masks, cache, tile, mode=layer_mode, slot=i, first=first and bool(layer_mode))
            first = first and not layer_mode
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.config.logit_scale != 1.0:
            logits = logits / self.config.logit_scale
        logits = logits.float()
        cap = self.config.final_logit_softcap
        return cap * torch.tanh(logits / cap) if cap is not None else logits

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        cache: KVCache | StaticKVCache | None = None,
        return_logits: bool | None = None,
        logits_to_keep: int = 0,
        return_logps: bool = False,
        temperature: float = 1.0,
    ) -> CausalLMOutput:
        """Loss (sum over target tokens / num_items_in_batch, or their mean) and/or logits.

        labels [B, T] are aligned with input_ids (shifted here); -100 marks tokens without loss. A target whose
        position id is 0 starts a new packed example and is never predicted from the previous one.
        return_logps (with labels) also gives the targets' log-probabilities, differentiable and still without
        full logits (token_logps, logps, num_targets_per_row); the loss is then computed from them.
        temperature divides the logits of the loss / log-probs (GRPO scores completions at the temperature they were
        sampled at, as TRL does); it is applied to the hidden states, so it needs a model without a logit soft-cap.
        """
        if temperature != 1.0 and self.config.final_logit_softcap is not None:
            raise ValueError(
                f"temperature {temperature} with final_logit_softcap {self.config.final_logit_softcap}: the soft-cap "
                "applies before the temperature, which the chunked head cannot do yet; use temperature 1.0"
            )
        if return_logps and labels is None:
            raise ValueError("return_logps=True needs labels: the log-probabilities are those of the label tokens")
        hidden = self.hidden_states(input_ids, attention_mask, position_ids, cache)
        out = CausalLMOutput()
        if labels is not None:
            targets = shifted_targets(labels, position_ids)
            keep = targets.reshape(-1) != IGNORE_INDEX
            h = hidden[:, :-1].reshape(-1, hidden.shape[-1])[keep]  # [N, H] only tokens with a target
            divide = temperature * self.config.logit_scale  # logits / d = (h / d) W^T: the chunked head sees h / d
            h = h / divide if divide != 1.0 else h
            kept_targets = targets.reshape(-1)[keep]  # [N]
            cap = self.config.final_logit_softcap
            if return_logps:
                logps = linear_token_logps(h, self.lm_head.weight, kept_targets, cap)  # [N]
                keep_rows = keep.view(targets.shape)  # [B, T-1]
                out.token_logps = logps.new_zeros(targets.shape).masked_scatter(keep_rows, logps)
                out.logps = out.token_logps.sum(-1)  # [B]
                out.num_targets_per_row = keep_rows.sum(-1)
                total = -logps.sum()
            else:
                total = linear_cross_entropy(h, self.lm_head.weight, kept_targets, cap)
            count = keep.sum()
            denom = num_items_in_batch if num_items_in_batch is not None else count.clamp(min=1)
            out.loss = total / denom
            out.num_targets = count
        if labels is None or return_logits:
            kept = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
            out.logits = self.logits(kept)
        return out

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype


def num_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Parameters of `module` (tied ones once); a quantized linear counts as its [out, in] weight (+ bias), not its
    packed storage."""
    seen: set[int] = set()
    total = 0
    for m in module.modules():
        quantized = isinstance(m, FrozenQuantLinear)
        if quantized and not trainable_only:
            total += m.out_features * m.in_features
        for p in m.parameters(recurse=False):
            if id(p) in seen or (trainable_only and not p.requires_grad) or (quantized and p is not m.bias):
                continue
            seen.add(id(p))
            total += p.numel()
    return total
