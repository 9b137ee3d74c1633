"""velotune: fast, memory-lean LLM fine-tuning. The public API is the names below."""

from velotune.api import fit, load_model, save_pretrained
from velotune.compat import FastLanguageModel, is_bfloat16_supported
from velotune.errors import VelotuneError
from velotune.lora.apply import LoRAConfig, get_peft_model, merge_lora
from velotune.lora.peft_format import load_adapter

__all__ = [
    "FastLanguageModel",
    "LoRAConfig",
    "VelotuneError",
    "fit",
    "get_peft_model",
    "is_bfloat16_supported",
    "load_adapter",
    "load_model",
    "merge_lora",
    "save_pretrained",
]
__version__ = "0.1.0"
