"""Drop-in compatibility with the FastLanguageModel tutorials and with transformers / TRL trainers.

`FastLanguageModel.from_pretrained` returns a VelotuneForCausalLM: velotune's decoder behind the interface
transformers.Trainer and trl.SFTTrainer use (see hf_model.py for what is supported, DeepSpeed included).
Compatibility wraps velotune's objects; no transformers or TRL class is patched.
"""

from velotune.compat.chat_templates import get_chat_template, standardize_sharegpt, train_on_responses_only
from velotune.compat.fast_model import FastLanguageModel, is_bfloat16_supported
from velotune.compat.hf_model import VelotuneForCausalLM

__all__ = [
    "FastLanguageModel",
    "VelotuneForCausalLM",
    "get_chat_template",
    "is_bfloat16_supported",
    "standardize_sharegpt",
    "train_on_responses_only",
]
