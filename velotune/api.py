"""The small Python API: load, add LoRA, train, save; the same steps `velotune train` runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from velotune.data import DataConfig, build_datasets
from velotune.errors import ConfigError
from velotune.lora.apply import merge_lora
from velotune.lora.peft_format import save_adapter
from velotune.models.decoder import CausalLM
from velotune.train.config import KEYS, TrainConfig, run_config_from_dict
from velotune.train.loop import Trainer, TrainResult


def train(model: CausalLM, tokenizer: Any, dataset: str | Path, **kwargs: Any) -> TrainResult:
    """Train `model` in place on a dataset file; keyword arguments are config keys (learning_rate, max_steps, ...)."""
    bad = [k for k in kwargs if k in KEYS and KEYS[k][0] == "lora"]
    if bad:
        raise ConfigError(f"{', '.join(bad)}: LoRA settings belong to get_peft_model(), not train()")
    cfg = run_config_from_dict({"dataset": str(dataset), **kwargs}, source="train()")
    data: DataConfig = cfg.data
    tc: TrainConfig = cfg.train
    train_ds, _ = build_datasets(data, tokenizer)
    model.gradient_checkpointing = tc.gradient_checkpointing
    out_dir = Path(tc.output_dir) if tc.output_dir else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(model, train_ds, tc, tokenizer.pad_token_id, out_dir, data.packing, data.max_seq_length)
    return trainer.train()


def save_pretrained(model: CausalLM, tokenizer: Any, out_dir: str | Path, merged: bool = False) -> Path:
    """Write the PEFT adapter (or, with merged=True, the merged model in HF layout) and the tokenizer."""
    out = Path(out_dir)
    if merged or not hasattr(model, "lora_config"):
        from velotune.export.hf import save_hf

        return save_hf(merge_lora(model), tokenizer, out)
    save_adapter(model, out, base_model=getattr(model, "source", None))
    tokenizer.save_pretrained(str(out))
    return out
