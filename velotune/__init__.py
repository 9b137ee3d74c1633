"""velotune: fast, memory-lean LLM fine-tuning. The public API is the names below."""

from velotune.api import save_pretrained, train
from velotune.errors import VelotuneError
from velotune.lora.apply import LoRAConfig, get_peft_model, merge_lora
from velotune.lora.peft_format import load_adapter
from velotune.models.load import load_model

__all__ = [
    "LoRAConfig",
    "VelotuneError",
    "get_peft_model",
    "load_adapter",
    "load_model",
    "merge_lora",
    "save_pretrained",
    "train",
]
__version__ = "0.1.0"
