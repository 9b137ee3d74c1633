"""Adapters in PEFT's file format: adapter_config.json + adapter_model.safetensors.

Keys are `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight` (and, for DoRA,
`.lora_magnitude_vector`, with no `.weight`), which is what `peft.PeftModel.from_pretrained` reads for a
transformers model with the same module names as ours.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from velotune.errors import ModelLoadError
from velotune.lora.apply import LoRAConfig, get_peft_model, lora_layers
from velotune.lora.layers import LoRALinear

PREFIX = "base_model.model."
# adapter parameter of a LoRALinear -> the suffix of its key in PEFT's file
PEFT_SUFFIX = {"lora_A": ".weight", "lora_B": ".weight", "lora_magnitude_vector": ""}


def peft_key(param_name: str) -> str:
    """PEFT's file key for an adapter parameter by its name in the model (`model.layers.0.mlp.up_proj.lora_A`)."""
    return f"{PREFIX}{param_name}{PEFT_SUFFIX[param_name.rpartition('.')[2]]}"


def adapter_params(name: str, layer: LoRALinear) -> dict[str, nn.Parameter]:
    """The adapter parameters of the LoRA layer at `name`, by PEFT's file key."""
    parts = [p for p in PEFT_SUFFIX if getattr(layer, p) is not None]
    return {peft_key(f"{name}.{part}"): getattr(layer, part) for part in parts}


def adapter_state_dict(model: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return {
        key: p.detach().to("cpu", dtype).contiguous()
        for name, layer in lora_layers(model).items()
        for key, p in adapter_params(name, layer).items()
    }


def adapter_state_dict_from(weights: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> dict:
    """PEFT's adapter keys for whole adapter weights by parameter name (`...q_proj.lora_A`), e.g. gathered from
    FSDP."""
    return {
        peft_key(name): t.detach().to("cpu", dtype).contiguous()
        for name, t in weights.items()
        if name.rpartition(".")[2] in PEFT_SUFFIX
    }


def save_adapter(
    model: nn.Module,
    out_dir: str | Path,
    base_model: str | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the model's LoRA (or DoRA) weights and config in PEFT's layout; returns the directory. `weights`
    (whole adapter weights by parameter name) replaces reading them from `model`, whose own may be shards."""
    cfg: LoRAConfig = model.lora_config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state_dict(model) if weights is None else adapter_state_dict_from(weights)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": sorted(cfg.target_modules),
        "use_rslora": cfg.use_rslora,
        "use_dora": cfg.use_dora,
        "bias": cfg.bias,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Attach the PEFT adapter in `adapter_dir` to `model` (in place); every adapter tensor must find its layer."""
    path = Path(adapter_dir)
    cfg_file, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_file.exists() or not weights.exists():
        raise ModelLoadError(f"{path}: expected adapter_config.json and adapter_model.safetensors (a PEFT adapter)")
    raw = json.loads(cfg_file.read_text())
    if raw.get("peft_type", "LORA") != "LORA":
        raise ModelLoadError(f"{cfg_file}: only LoRA and DoRA adapters can be loaded (found {raw.get('peft_type')})")
    cfg = LoRAConfig(
        r=raw["r"],
        lora_alpha=raw["lora_alpha"],
        target_modules=list(raw["target_modules"]),
        use_rslora=raw.get("use_rslora", False),
        use_dora=bool(raw.get("use_dora", False)),
    )
    get_peft_model(model, cfg)
    tensors = load_file(str(weights))
    layers = lora_layers(model)
    used = set()
    for name, layer in layers.items():
        for key, param in adapter_params(name, layer).items():
            if key not in tensors:
                raise ModelLoadError(f"{weights}: no tensor {key} for layer {name}")
            if tensors[key].shape != param.shape:
                raise ModelLoadError(
                    f"{weights}: {key} has shape {tuple(tensors[key].shape)}, the layer {tuple(param.shape)}"
                )
            param.data.copy_(tensors[key])
            used.add(key)
    extra = sorted(set(tensors) - used)
    if extra:
        raise ModelLoadError(f"{weights}: tensors with no matching layer: {', '.join(extra[:5])}")
    return model
