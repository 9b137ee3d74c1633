"""Models for generation from what a run wrote: its merged model, its base model + adapter, or a checkpoint
(`velotune generate`, `chat` and `export` use the first two; the dashboard's chat pane all three)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from velotune.errors import ConfigError, ModelLoadError


def _device_and_dtype() -> tuple[str, torch.dtype]:
    cuda = torch.cuda.is_available()
    return ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)


def load_for_generation(source: str | None) -> tuple[Any, Any]:
    """Model + tokenizer from a run directory (merged model, or base + adapter) or any model source."""
    from velotune.lora.peft_format import load_adapter
    from velotune.models.load import load_model

    device, dtype = _device_and_dtype()
    path = Path(source) if source else None
    if path is not None and (path / "config.yaml").exists() and not (path / "config.json").exists():
        if (path / "merged").exists():
            return load_model(path / "merged", dtype, device)
        if not (path / "adapter").exists():
            raise ModelLoadError(f"{path}: run directory without adapter/ or merged/; was the run finished?")
        base = yaml.safe_load((path / "config.yaml").read_text()).get("model_name_or_path")
        model, tok = load_model(base, dtype, device)
        load_adapter(model, path / "adapter")
        return model, tok
    return load_model(source, dtype, device)


def load_checkpoint_for_generation(checkpoint: Path) -> tuple[Any, Any]:
    """Model + tokenizer as they were at a checkpoint: the base model of its config, prepared as the run prepared
    it (LoRA, partial or full), with the checkpoint's trained weights put back."""
    from velotune.quant.loading import load_quantized
    from velotune.train.checkpoint import load_checkpoint, missing_files
    from velotune.train.config import run_config_from_dict
    from velotune.train.loop import load_trained
    from velotune.train.run import prepare_model

    missing = missing_files(checkpoint)
    if missing:
        raise ModelLoadError(f"{checkpoint}: not a complete checkpoint (missing {', '.join(missing)})")
    try:
        values = yaml.safe_load((checkpoint / "config.yaml").read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{checkpoint / 'config.yaml'}: not valid YAML ({exc})") from exc
    values = {k: v for k, v in values.items() if k not in ("resume", "output_dir")}
    cfg = run_config_from_dict(values, source=str(checkpoint / "config.yaml"))
    device, dtype = _device_and_dtype()
    model, tok = load_quantized(cfg.train.model_name_or_path, cfg.train.quantization, dtype, torch.device(device))
    torch.manual_seed(cfg.train.seed)
    prepare_model(model, cfg, lambda message: None)
    load_trained(model, None, load_checkpoint(checkpoint, with_optimizer=False))
    return model.eval(), tok
