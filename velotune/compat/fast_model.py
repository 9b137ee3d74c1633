"""FastLanguageModel: the from_pretrained / get_peft_model / for_inference / for_training calls of the tutorials
users already have, on velotune's loader, LoRA and checkpointing.

    from velotune import FastLanguageModel
    model, tokenizer = FastLanguageModel.from_pretrained("model_dir_or.gguf", max_seq_length=2048, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, use_gradient_checkpointing="unsloth")

Arguments with no velotune counterpart raise a ConfigError naming the argument and what to use instead, rather
than being ignored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from velotune.api import load_model
from velotune.compat.hf_model import VelotuneForCausalLM
from velotune.errors import ConfigError, ModelLoadError
from velotune.lora.apply import ALL_PROJECTIONS, LoRAConfig, get_peft_model
from velotune.lora.peft_format import load_adapter

_UNSET: Any = object()  # tells an explicit load_in_4bit=True from the default
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_CHECKPOINTING = {True: True, False: False, "unsloth": "offload", "offload": "offload"}

# from_pretrained arguments accepted for compatibility that change nothing here.
_IGNORED_LOAD_ARGS = (
    "fix_tokenizer",
    "trust_remote_code",
    "attn_implementation",
    "random_state",
    "use_exact_model_name",
)
# ... that only matter with fast_inference (vLLM), which is refused anyway.
_VLLM_ARGS = ("gpu_memory_utilization", "float8_kv_cache", "max_lora_rank", "disable_log_stats")
_UNSUPPORTED_LOAD_ARGS = {
    "fast_inference": "velotune generates with its own KV cache (model.generate); drop fast_inference",
    "rope_scaling": "velotune uses the checkpoint's RoPE settings; keep max_seq_length within its context",
    "resize_model_vocab": "velotune keeps the checkpoint's vocabulary",
    "load_in_16bit": "16-bit is the default when load_in_4bit, load_in_8bit and load_in_fp8 are False",
}
_UNSUPPORTED_PEFT_ARGS = {
    "loftq_config": "LoftQ initialisation is not supported; drop loftq_config (QLoRA works with load_in_4bit=True)",
    "bias": "only bias='none' is supported; LoRA trains no bias terms",
    "modules_to_save": "embeddings / lm_head cannot be trained with LoRA here; use full_finetuning=True",
    "layers_to_transform": "LoRA goes on every layer; restrict by target_modules instead",
    "layers_pattern": "LoRA goes on every layer; restrict by target_modules instead",
    "init_lora_weights": "only PEFT's default initialisation (init_lora_weights=True) is supported",
    "qat_scheme": "quantization-aware training is not supported; use load_in_4bit=True for QLoRA",
    "temporary_location": None,  # accepted, unused (no offloading to disk)
}
_PEFT_DEFAULTS: dict[str, Any] = {
    "loftq_config": (None, {}),
    "bias": ("none",),
    "modules_to_save": (None,),
    "layers_to_transform": (None,),
    "layers_pattern": (None,),
    "init_lora_weights": (True,),
    "qat_scheme": (None,),
}


def is_bfloat16_supported() -> bool:
    """Whether this machine trains in bfloat16 (a CUDA GPU that supports it)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; use None (automatic), {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _device(device_map: Any) -> str | None:
    """A single device for `device_map`; velotune keeps a model on one device (multi-GPU is data-parallel)."""
    if device_map in (None, "auto", "sequential", "balanced"):
        return None
    if isinstance(device_map, dict):
        places = set(device_map.values())
        if len(places) != 1:
            raise ConfigError(
                f"device_map {device_map} splits the model across devices; velotune keeps it on one device "
                "(train on several GPUs with torchrun / accelerate launch instead)"
            )
        device_map = places.pop()
    return f"cuda:{device_map}" if isinstance(device_map, int) else str(device_map)


def _hub_snapshot(repo_id: str, token: str | None, revision: str | None) -> Path:
    """A local snapshot of hub repo `repo_id` (weights, config, tokenizer), with the user's token."""
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model"]
        return Path(snapshot_download(repo_id, token=token, revision=revision, allow_patterns=patterns))
    except (ImportError, OSError) as exc:
        raise ModelLoadError(
            f"could not download {repo_id!r} from the Hugging Face hub ({type(exc).__name__}: {exc}); check the id, "
            "the token and your network, or pass a local directory or .gguf file"
        ) from exc


def _adapter_base(path: Path) -> str:
    raw = json.loads((path / "adapter_config.json").read_text())
    base = raw.get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(
            f"{path / 'adapter_config.json'}: no base_model_name_or_path; load the base model and "
            "attach the adapter with velotune.load_adapter(model, dir)"
        )
    return base


class FastLanguageModel:
    """Static methods with the names and arguments of the FastLanguageModel tutorials."""

    @staticmethod
    def from_pretrained(
        model_name: str | Path | None = None,
        max_seq_length: int | None = None,
        dtype: torch.dtype | str | None = None,
        load_in_4bit: bool = _UNSET,
        load_in_8bit: bool = False,
        load_in_fp8: bool = False,
        full_finetuning: bool = False,
        token: str | None = None,
        device_map: Any = None,
        revision: str | None = None,
        use_gradient_checkpointing: bool | str = "unsloth",
        **kwargs: Any,
    ) -> tuple[VelotuneForCausalLM, Any]:
        """(model, tokenizer) from a Hugging Face directory, a .gguf file, a hub id (online), a PEFT adapter
        directory (its base is loaded, then the adapter), or None for the embedded SmolLM2.

        load_in_4bit defaults to True, as in the tutorials (NF4 base weights for QLoRA; `-bnb-4bit` checkpoints are
        read as stored); load_in_fp8=True stores the decoder's linears in FP8 and multiplies in FP8 (a GPU of compute
        capability 8.9+, or the reference on CPU; FP8 checkpoints are read as stored); full_finetuning=True loads
        16-bit weights that all train. dtype None: bfloat16 on CUDA,
        float32 on CPU.
        """
        for name, value in kwargs.items():
            if name in _UNSUPPORTED_LOAD_ARGS and value not in (None, False):
                raise ConfigError(f"from_pretrained({name}=...): {_UNSUPPORTED_LOAD_ARGS[name]}")
            if name not in (*_UNSUPPORTED_LOAD_ARGS, *_IGNORED_LOAD_ARGS, *_VLLM_ARGS):
                raise ConfigError(f"from_pretrained() got an unexpected argument {name!r}")
        if kwargs.get("trust_remote_code"):
            raise ConfigError("trust_remote_code=True: velotune runs its own decoder and never executes hub code")
        if full_finetuning and (load_in_4bit is True or load_in_8bit or load_in_fp8):
            raise ConfigError(
                "full_finetuning=True trains every weight in 16-bit; it cannot be combined with load_in_4bit, "
                "load_in_8bit or load_in_fp8 (use LoRA via get_peft_model for a quantized base)"
            )
        default_4bit = not (full_finetuning or load_in_8bit or load_in_fp8)
        load_in_4bit = default_4bit if load_in_4bit is _UNSET else load_in_4bit
        if use_gradient_checkpointing not in _CHECKPOINTING:
            raise ConfigError(
                f"use_gradient_checkpointing={use_gradient_checkpointing!r}; use True, False or 'unsloth' (offload)"
            )
        source: Any = model_name
        if model_name is not None and not Path(str(model_name)).expanduser().exists() and token:
            source = _hub_snapshot(str(model_name), token, revision)
        elif revision is not None:
            raise ConfigError("revision= applies to hub ids only; pass a local path without it")
        adapter_dir = None
        if source is not None and (Path(str(source)).expanduser() / "adapter_config.json").is_file():
            adapter_dir = Path(str(source)).expanduser()
            source = _adapter_base(adapter_dir)
        lm, tokenizer = load_model(
            source, _dtype(dtype), load_in_4bit, load_in_8bit, _device(device_map), load_in_fp8=load_in_fp8
        )
        if adapter_dir is not None:
            load_adapter(lm, adapter_dir)
            if (adapter_dir / "tokenizer_config.json").is_file():
                from velotune.models.load import load_tokenizer

                tokenizer = load_tokenizer(adapter_dir)
        limit = lm.config.max_position_embeddings
        if max_seq_length is not None and max_seq_length > limit:
            raise ConfigError(
                f"max_seq_length={max_seq_length} exceeds the model's context of {limit} tokens; velotune does not "
                f"extend the context with RoPE scaling, so use max_seq_length <= {limit}"
            )
        if max_seq_length is not None:
            tokenizer.model_max_length = max_seq_length
        lm.gradient_checkpointing = _CHECKPOINTING[use_gradient_checkpointing]
        model = VelotuneForCausalLM(lm, max_seq_length, full_finetuning)
        return model, tokenizer

    @staticmethod
    def get_peft_model(
        model: VelotuneForCausalLM,
        r: int = 16,
        target_modules: list[str] | str | None = None,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        bias: str = "none",
        use_gradient_checkpointing: bool | str = "unsloth",
        random_state: int = 3407,
        max_seq_length: int | None = None,
        use_rslora: bool = False,
        use_dora: bool = False,
        loftq_config: Any = None,
        **kwargs: Any,
    ) -> VelotuneForCausalLM:
        """Add trainable LoRA to the linear projections (in place; the same model is returned).

        use_gradient_checkpointing: True recomputes each layer in backward, "unsloth" also keeps the saved layer
        inputs in host memory (velotune's "offload"), False keeps all activations. use_dora: PEFT's DoRA (a trained
        magnitude per output feature; the adapter loads in PEFT).
        """
        given = {"bias": bias, "loftq_config": loftq_config, **kwargs}
        for name, value in given.items():
            if name not in _UNSUPPORTED_PEFT_ARGS:
                raise ConfigError(f"get_peft_model() got an unexpected argument {name!r}")
            if name in _PEFT_DEFAULTS and not any(value is d or value == d for d in _PEFT_DEFAULTS[name]):
                raise ConfigError(f"get_peft_model({name}={value!r}): {_UNSUPPORTED_PEFT_ARGS[name]}")
        if not isinstance(model, VelotuneForCausalLM):
            raise ConfigError(
                f"get_peft_model needs the model FastLanguageModel.from_pretrained returned, got {type(model).__name__}"
            )
        if model.full_finetuning:
            raise ConfigError("this model was loaded with full_finetuning=True; train it as is, without LoRA")
        if model.has_lora:
            raise ConfigError("this model already has LoRA adapters; get_peft_model is called once per model")
        if use_gradient_checkpointing not in _CHECKPOINTING:
            raise ConfigError(
                f"use_gradient_checkpointing={use_gradient_checkpointing!r}; use True, False or 'unsloth' (offload)"
            )
        targets = list(ALL_PROJECTIONS) if target_modules in (None, "all-linear") else target_modules
        targets = [targets] if isinstance(targets, str) else list(targets)
        unknown = sorted(set(targets) - set(ALL_PROJECTIONS))
        if unknown:
            raise ConfigError(
                f"target_modules {unknown} are not LoRA targets here; choose among {', '.join(ALL_PROJECTIONS)} "
                "(embed_tokens / lm_head train with full_finetuning=True)"
            )
        limit = model.model.config.max_position_embeddings
        if max_seq_length is not None and max_seq_length > limit:
            raise ConfigError(f"max_seq_length={max_seq_length} exceeds the model's context of {limit} tokens")
        torch.manual_seed(random_state)  # LoRA A is drawn from the global generator
        cfg = LoRAConfig(
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=targets,
            use_rslora=use_rslora,
            use_dora=use_dora,
        )
        get_peft_model(model.model, cfg)
        model.model.gradient_checkpointing = _CHECKPOINTING[use_gradient_checkpointing]
        if max_seq_length is not None:
            model.max_seq_length = max_seq_length
        return model

    @staticmethod
    def for_inference(model: VelotuneForCausalLM) -> VelotuneForCausalLM:
        """Evaluation mode (no dropout, no checkpointing); generate() uses its KV cache either way."""
        model.eval()
        model.config.use_cache = True
        return model

    @staticmethod
    def for_training(model: VelotuneForCausalLM, use_gradient_checkpointing: bool = True) -> VelotuneForCausalLM:
        """Training mode again after for_inference; the checkpointing policy set by get_peft_model is kept."""
        model.train()
        if not use_gradient_checkpointing:
            model.gradient_checkpointing_disable()
        return model
