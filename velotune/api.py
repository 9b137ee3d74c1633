"""The small Python API: load, add LoRA, train, save; the same steps `velotune train` runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from velotune.data import DataConfig
from velotune.errors import ConfigError
from velotune.lora.apply import merge_lora
from velotune.lora.peft_format import save_adapter
from velotune.models.decoder import CausalLM
from velotune.quant.loading import load_quantized
from velotune.train.config import KEYS, TrainConfig, run_config_from_dict
from velotune.train.loop import Trainer, TrainResult
from velotune.train.memory import resolve_checkpoint_layers


def load_model(
    source: str | Path | None = None,
    dtype: torch.dtype | None = None,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    device: str | torch.device | None = None,
    load_in_fp8: bool = False,
) -> tuple[CausalLM, Any]:
    """(model, tokenizer) from an HF directory, a .gguf file, a hub id, or None for the embedded SmolLM2.

    dtype defaults to bfloat16 on CUDA and float32 on CPU; load_in_4bit quantizes the decoder's linear layers to NF4
    while loading (bitsandbytes 4-bit checkpoints load as stored), load_in_8bit to int8, load_in_fp8 to FP8 (e4m3
    with a scale per output channel, FP8 matmuls; FP8 checkpoints load as stored).
    """
    chosen = [
        k
        for k, v in (("load_in_4bit", load_in_4bit), ("load_in_8bit", load_in_8bit), ("load_in_fp8", load_in_fp8))
        if v
    ]
    if len(chosen) > 1:
        raise ConfigError(f"{' and '.join(chosen)} are set together; choose one")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    method = "nf4" if load_in_4bit else "int8" if load_in_8bit else "fp8" if load_in_fp8 else None
    return load_quantized(source, method, dtype, device)


def fit(model: CausalLM, tokenizer: Any, dataset: str | Path, **kwargs: Any) -> TrainResult:
    """Train `model` in place on a dataset file; keyword arguments are config keys (learning_rate, max_steps, ...;
    method="dpo" / "orpo" / "simpo" with beta, loss_type, ... trains on preference pairs; method="grpo" with
    reward_funcs=[callables or names] on prompts)."""
    bad = [k for k in kwargs if k in KEYS and KEYS[k][0] == "lora"]
    if bad:
        raise ConfigError(f"{', '.join(bad)}: LoRA settings belong to get_peft_model(), not fit()")
    from velotune.train.objectives import build_objective
    from velotune.train.rewards import reward_name
    from velotune.train.run import check_paths, load_data

    funcs = kwargs.pop("reward_funcs", None)
    funcs = [funcs] if callable(funcs) or isinstance(funcs, str) else funcs
    if funcs is not None:  # the config holds names; the functions themselves go to the objective
        kwargs["reward_funcs"] = [f if isinstance(f, str) else reward_name(f) for f in funcs]
    cfg = run_config_from_dict({"dataset": str(dataset), **kwargs}, source="fit()")
    data: DataConfig = cfg.data
    tc: TrainConfig = cfg.train
    check_paths(cfg, funcs)
    train_ds, _ = load_data(cfg, tokenizer, funcs)
    model.gradient_checkpointing = tc.gradient_checkpointing
    model.checkpoint_layers, why = resolve_checkpoint_layers(cfg, model.config, next(model.parameters()).device)
    if why:
        print(why)
    out_dir = Path(tc.output_dir) if tc.output_dir else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(
        model,
        train_ds,
        tc,
        tokenizer.pad_token_id,
        out_dir,
        data.packing,
        data.max_seq_length,
        objective=build_objective(tc, tokenizer, funcs),
    )
    return trainer.train()


def save_pretrained(model: CausalLM, tokenizer: Any, out_dir: str | Path, merged: bool = False) -> Path:
    """Write the PEFT adapter (or, with merged=True, the merged model in HF layout) and the tokenizer."""
    out = Path(out_dir)
    if merged or model.lora_config is None:
        from velotune.export.hf import save_hf

        return save_hf(merge_lora(model), tokenizer, out)
    save_adapter(model, out, base_model=model.source)
    tokenizer.save_pretrained(str(out))
    return out
