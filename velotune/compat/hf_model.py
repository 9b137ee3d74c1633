"""VelotuneForCausalLM: velotune's decoder behind the interface transformers.Trainer and trl.SFTTrainer drive.

The wrapper holds a velotune CausalLM as `.model` and adds what those trainers read: a transformers config
(`config`, `generation_config`), `forward(input_ids, attention_mask, position_ids, labels, num_items_in_batch)`
returning a subscriptable CausalLMOutputWithPast, activation-checkpointing switches, embeddings accessors, a
`base_model` that returns the final hidden states (TRL's fused LM head calls it), `generate()`, and the saving
methods of the FastLanguageModel API. Nothing of transformers or TRL is patched; the trainers see a plain nn.Module.

What the trainers rely on, and why it holds:
- Loss: the sum of token losses divided by Trainer's `num_items_in_batch` (target tokens of the whole
  accumulated step, counted over labels[..., 1:] because `loss_type` is "ForCausalLM"), so gradient accumulation
  gives the update of one large batch whatever the sequence lengths. `accepts_loss_kwargs` tells Trainer not to
  divide the loss by the accumulation steps again.
- Quantized models: nothing here sets `is_quantized`, `hf_quantizer`, `quantization_method` or
  `is_loaded_in_4bit`, so Trainer does not refuse a 4-bit model and SFTTrainer does not cast the fp32 LoRA weights
  to bf16. The 4-bit weights are velotune's own frozen buffers; only LoRA weights train.
- Precision: the model computes in the dtype it was loaded in (bfloat16 on CUDA by default; the 4-bit layers and
  fused kernels choose their own internal precision). Trainer's fp16/bf16 flags turn on autocast, which forward()
  switches off again, so those flags change nothing here; fp16=True still scales the loss, which is harmless for
  the fp32 LoRA weights.
- Checkpoints: Trainer saves `state_dict()` of a model that is not a PreTrainedModel; the tied LM head is left out
  of it (it is the embedding), so safetensors accepts it and `resume_from_checkpoint` restores it. Those
  checkpoints hold every weight; `model.save_pretrained(dir)` writes the PEFT adapter alone.
- trl.DPOTrainer replaces `forward` on this instance with its fused LM head: with `fused_lm_head=True` it reads
  `base_model(input_ids, attention_mask).last_hidden_state`, `get_output_embeddings()` (weight, bias) and
  `config.get_text_config()` (softcapping, logit scale), otherwise it calls the forward above. This wrapper is not a
  peft.PeftModel, so DPOTrainer does not switch its adapter off for the reference: pass
  `ref_model=model.create_reference_model()` (shares the frozen weights) or `precompute_ref_log_probs=True` (the
  policy's log-probs before the first step). With neither, TRL loads a second, transformers copy of the base
  checkpoint from `config._name_or_path` as the reference: unquantized, and without a loaded adapter.

DeepSpeed (through Trainer's `deepspeed=` argument; accelerate wraps this module like any other):
- ZeRO stage 1 and 2, with or without optimizer offload to CPU: supported for LoRA (16-bit or 4-bit base) and for
  full fine-tuning of a 16-bit model. The 4-bit weights are buffers, which ZeRO neither partitions nor updates.
- ZeRO stage 3 is not supported: velotune's fused kernels read `weight` tensors of child modules directly (LoRA
  base layers, the LM head inside the fused cross-entropy), which ZeRO-3 only gathers around a module's own
  forward. forward() raises a VelotuneError naming this when it sees ZeRO-3-partitioned parameters.
- Multi-GPU without DeepSpeed: DDP (torchrun / accelerate launch) works as for any nn.Module.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from velotune.errors import ConfigError, VelotuneError
from velotune.models.decoder import CausalLM, num_parameters
from velotune.models.families import family_for

# Keyword arguments Trainer, TRL or user code pass that change nothing for this model.
_IGNORED_KWARGS = frozenset(
    {
        "use_cache",
        "return_dict",
        "cache_position",
        "token_type_ids",
        "output_router_logits",
        "cu_seq_lens_q",  # padding-free collators: position_ids restarting at 0 carry the same boundaries
        "cu_seq_lens_k",
        "max_length_q",
        "max_length_k",
    }
)
_UNSUPPORTED_KWARGS = {
    "inputs_embeds": "pass input_ids",
    "past_key_values": "use model.generate(), which keeps its own KV cache",
    "output_attentions": "velotune's attention kernels do not return attention weights",
    "output_hidden_states": "use model.base_model(input_ids).last_hidden_state for the final hidden states",
    "shift_labels": "pass labels aligned with input_ids; the model shifts them",
    "pixel_values": "velotune trains text-only decoders",
}


def hf_config(lm: CausalLM) -> Any:
    """The transformers config (LlamaConfig, Qwen2Config ...) describing `lm`, as Trainer and TRL read it."""
    from transformers import AutoConfig

    fields = family_for(lm.config.model_type).to_hf(lm.config)
    fields.pop("quantization_config", None)  # our 4-bit weights are not transformers-quantized ones
    fields.pop("transformers_version", None)
    fields["model_type"] = fields.get("model_type", lm.config.model_type)
    config = AutoConfig.for_model(**fields)
    config._name_or_path = lm.source or ""
    config.use_cache = True
    return config


def _drop_tied_head(module: VelotuneForCausalLM, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook: the tied LM head is the embedding matrix; keep one copy (safetensors refuses two)."""
    for key in module._keys_to_ignore_on_save or ():
        state_dict.pop(prefix + key, None)


class _Backbone:
    """`model.base_model`: the decoder without its LM head, returning transformers' BaseModelOutputWithPast."""

    def __init__(self, lm: CausalLM) -> None:
        self.lm = lm

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPast

        _check_kwargs(kwargs)
        with torch.autocast(self.lm.device.type, enabled=False):
            hidden = self.lm.hidden_states(input_ids, attention_mask, position_ids)  # [B, T, H]
        return BaseModelOutputWithPast(last_hidden_state=hidden)


def _check_kwargs(kwargs: dict[str, Any]) -> None:
    for name, value in kwargs.items():
        if name in _IGNORED_KWARGS or value is None or value is False:
            continue
        if name in _UNSUPPORTED_KWARGS:
            raise ConfigError(f"forward() got {name}: not supported by velotune's model; {_UNSUPPORTED_KWARGS[name]}")
        raise ConfigError(
            f"forward() got an unexpected argument {name!r}; velotune's model takes input_ids, attention_mask, "
            "position_ids, labels and num_items_in_batch (a dataset column that is not a model input should be "
            "removed, e.g. TrainingArguments(remove_unused_columns=True))"
        )


class VelotuneForCausalLM(nn.Module):
    """A velotune CausalLM (`.model`) with the attributes and methods transformers' trainers and users call."""

    main_input_name = "input_ids"
    accepts_loss_kwargs = True  # forward() normalises by num_items_in_batch itself
    loss_type = "ForCausalLM"  # Trainer then counts targets over labels[..., 1:], as the loss shifts them
    supports_gradient_checkpointing = True
    _is_velotune = True

    def __init__(self, lm: CausalLM, max_seq_length: int | None = None, full_finetuning: bool = False) -> None:
        from transformers import GenerationConfig

        super().__init__()
        self.model = lm
        self.config = hf_config(lm)
        self.generation_config = GenerationConfig.from_model_config(self.config)
        self.max_seq_length = max_seq_length
        self.full_finetuning = full_finetuning  # loaded to train every weight: get_peft_model refuses it
        self.model_tags: list[str] = []
        # transformers' name: keys a checkpoint leaves out and tie_weights() restores after loading
        self._keys_to_ignore_on_save = ["model.lm_head.weight"] if lm.config.tie_word_embeddings else None
        self.register_state_dict_post_hook(_drop_tied_head)

    # ---- what Trainer / SFTTrainer call -------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> Any:
        """Loss (token-loss sum / num_items_in_batch, else the mean over target tokens) and logits.

        In training with labels the logits are not built (the loss is fused with the LM head); in eval mode they
        are returned as well, as transformers models do, for Trainer.evaluate / compute_metrics.
        """
        from transformers.modeling_outputs import CausalLMOutputWithPast

        _check_kwargs(kwargs)
        if getattr(self.model.model.embed_tokens.weight, "ds_numel", None) is not None:
            raise VelotuneError(
                "DeepSpeed ZeRO stage 3 partitions parameters, which velotune's fused kernels read directly; "
                "use ZeRO stage 1 or 2 (optionally with offload_optimizer) instead"
            )
        with torch.autocast(self.device.type, enabled=False):  # see "Precision" in the module docstring
            out = self.model(
                input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                labels=labels,
                num_items_in_batch=num_items_in_batch,
                return_logits=labels is None or not self.training,
                logits_to_keep=logits_to_keep,
            )
        return CausalLMOutputWithPast(loss=out.loss, logits=out.logits)

    @property
    def base_model(self) -> _Backbone:
        return _Backbone(self.model)

    def tie_weights(self) -> None:
        self.model.tie_weights()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.model.lm_head

    def resize_token_embeddings(self, *args: Any, **kwargs: Any) -> None:
        raise ConfigError(
            "resize_token_embeddings is not supported: velotune keeps the checkpoint's vocabulary; choose a chat "
            "template whose markers the tokenizer already has (get_chat_template lists them)"
        )

    def enable_input_require_grads(self) -> None:
        """No-op: velotune's checkpointing does not need the embedding output to require grad."""

    def disable_input_require_grads(self) -> None:
        """No-op, see enable_input_require_grads."""

    def add_model_tags(self, tags: list[str] | str) -> None:
        for tag in [tags] if isinstance(tags, str) else tags:
            if tag not in self.model_tags:
                self.model_tags.append(tag)

    def create_reference_model(self) -> VelotuneForCausalLM:
        """A frozen copy of this model as it is now, for `trl.DPOTrainer(ref_model=...)`: DPOTrainer switches off
        the adapter of a peft.PeftModel for the reference, which this model is not.

        Unlike TRL's `create_reference_model`, only what trains is copied (the LoRA weights; every weight after
        full_finetuning=True); the frozen base weights, 4-bit or 16-bit, are the policy's own tensors. Its log-probs
        are the policy's at this moment: for a fresh adapter (B = 0) the base model's, for an adapter loaded from
        an SFT run that adapter's, as TRL's frozen "ref" adapter copy gives a PeftModel.
        """
        shared = {id(t): t for t in (*self.model.parameters(), *self.model.buffers()) if not t.requires_grad}
        lm = copy.deepcopy(self.model, memo=shared)
        lm.requires_grad_(False)
        for p in lm.parameters():
            p.grad = None
        lm.gradient_checkpointing = False  # the reference runs without gradients
        ref = VelotuneForCausalLM(lm, self.max_seq_length)
        ref.config, ref.generation_config = copy.deepcopy(self.config), copy.deepcopy(self.generation_config)
        ref.full_finetuning = self.full_finetuning
        return ref.eval()

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def has_lora(self) -> bool:
        return self.model.lora_config is not None

    # ---- activation checkpointing ---------------------------------------------------------------------------

    def activation_checkpointing_enable(
        self,
        activation_checkpointing_kwargs: dict[str, Any] | None = None,
        every_n_layers: int = 1,
        offload: bool = False,
    ) -> None:
        """Recompute every decoder layer in backward; offload=True also keeps saved layer inputs in host memory.

        An "offload" policy set by get_peft_model(use_gradient_checkpointing="unsloth") is kept when Trainer
        enables checkpointing without offload.
        """
        if every_n_layers != 1:
            raise ConfigError(f"every_n_layers={every_n_layers}: velotune checkpoints every decoder layer; use 1")
        extra = sorted(set(activation_checkpointing_kwargs or {}) - {"use_reentrant", "preserve_rng_state"})
        if extra:
            raise ConfigError(
                f"gradient_checkpointing_kwargs {extra} are not supported; velotune's checkpointing is non-reentrant"
            )
        current = self.model.gradient_checkpointing
        self.model.gradient_checkpointing = "offload" if offload or current == "offload" else True

    def gradient_checkpointing_enable(
        self,
        gradient_checkpointing_kwargs: dict[str, Any] | None = None,
        every_n_layers: int = 1,
        offload: bool = False,
    ) -> None:
        """transformers' older name for activation_checkpointing_enable."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, every_n_layers, offload)

    def activation_checkpointing_disable(self) -> None:
        self.model.gradient_checkpointing = False

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing_disable()

    @property
    def is_activation_checkpointing(self) -> bool:
        return bool(self.model.gradient_checkpointing)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.is_activation_checkpointing

    # ---- sizes ----------------------------------------------------------------------------------------------

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameters, counting each quantized weight at its unquantized size (transformers' signature)."""
        total = num_parameters(self.model, trainable_only=only_trainable)
        if exclude_embeddings:
            emb = self.get_input_embeddings().weight
            if emb.requires_grad or not only_trainable:
                total -= emb.numel()
        return total

    def floating_point_ops(self, inputs: dict[str, Any], exclude_embeddings: bool = True) -> int:
        """6 x tokens x non-embedding parameters: forward + backward matmul FLOPs, as transformers estimates them."""
        ids = inputs.get(self.main_input_name)
        tokens = int(ids.numel()) if isinstance(ids, torch.Tensor) else 0
        return 6 * tokens * self.num_parameters(exclude_embeddings=exclude_embeddings)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.num_parameters(only_trainable=True), self.num_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    # ---- generation -----------------------------------------------------------------------------------------

    def generate(self, inputs: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """Token ids [B, prompt + new] like transformers' generate; see velotune.compat.generation.generate."""
        from velotune.compat.generation import generate

        config = kwargs.pop("generation_config", None) or self.generation_config  # TRL passes its own
        return generate(self.model, config, inputs, **kwargs)

    def can_generate(self) -> bool:
        return True

    # ---- saving ---------------------------------------------------------------------------------------------

    def save_pretrained(
        self,
        save_directory: str | Path,
        is_main_process: bool = True,
        state_dict: dict | None = None,
        safe_serialization: bool = True,
        **kwargs: Any,
    ) -> Path:
        """The PEFT adapter (adapter_config.json + adapter_model.safetensors); the whole model in Hugging Face
        layout when it was fully fine-tuned. Files already in `save_directory` stay unless overwritten."""
        from velotune.compat.saving import save_adapter_or_model

        if kwargs.get("push_to_hub"):
            raise ConfigError("save_pretrained(push_to_hub=True) is not supported; call model.push_to_hub(repo_id)")
        if not safe_serialization:
            raise ConfigError("velotune writes safetensors only; drop safe_serialization=False")
        if state_dict is not None:
            raise ConfigError(
                "save_pretrained(state_dict=...) is not supported; velotune saves the model's own weights"
            )
        return save_adapter_or_model(self, save_directory) if is_main_process else Path(save_directory)

    def push_to_hub(self, repo_id: str, token: str | None = None, private: bool | None = None, **kwargs: Any) -> str:
        """Upload what save_pretrained writes to the hub repo `repo_id`; returns the repo URL."""
        from velotune.compat.saving import push_adapter

        return push_adapter(self, repo_id, token=token, private=private, **kwargs)

    def save_pretrained_merged(
        self, save_directory: str | Path, tokenizer: Any, save_method: str = "merged_16bit", **kwargs: Any
    ) -> Path:
        """LoRA merged into 16-bit weights (save_method="merged_16bit") or the adapter ("lora"), with the
        tokenizer; a merged export is reloaded and compared with this model before it is kept."""
        from velotune.compat.saving import save_merged

        return save_merged(self, save_directory, tokenizer, save_method=save_method, **kwargs)

    def push_to_hub_merged(
        self, repo_id: str, tokenizer: Any, save_method: str = "merged_16bit", token: str | None = None, **kwargs: Any
    ) -> str:
        from velotune.compat.saving import push_merged

        return push_merged(self, repo_id, tokenizer, save_method=save_method, token=token, **kwargs)

    def save_pretrained_gguf(
        self,
        save_directory: str | Path,
        tokenizer: Any,
        quantization_method: str | list[str] = "q8_0",
        **kwargs: Any,
    ) -> list[Path]:
        """GGUF file(s) of the merged model plus an Ollama Modelfile; each file is reloaded and checked."""
        from velotune.compat.saving import save_gguf

        return save_gguf(self, save_directory, tokenizer, quantization_method=quantization_method, **kwargs)

    def push_to_hub_gguf(
        self,
        repo_id: str,
        tokenizer: Any,
        quantization_method: str | list[str] = "q8_0",
        token: str | None = None,
        **kwargs: Any,
    ) -> str:
        from velotune.compat.saving import push_gguf

        return push_gguf(self, repo_id, tokenizer, quantization_method=quantization_method, token=token, **kwargs)
