"""Adapters velotune saves load in PEFT on the transformers model, unchanged, with the same logits."""

import torch
from peft import PeftModel

from tests.helpers import velotune_from_hf
from velotune.lora.apply import get_peft_model, lora_layers
from velotune.lora.peft_format import load_adapter, save_adapter


def _trained_like(model):
    torch.manual_seed(3)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.05)
    return model


def test_adapter_loads_in_peft(tiny_hf_llama, tmp_path):
    ours = _trained_like(get_peft_model(velotune_from_hf(tiny_hf_llama), r=8, lora_alpha=16, use_rslora=True))
    save_adapter(ours, tmp_path, base_model="tiny")
    peft_model = PeftModel.from_pretrained(tiny_hf_llama, str(tmp_path)).eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = peft_model(input_ids=ids).logits
        out = ours.eval()(ids).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ref, base, atol=1e-4)  # the adapter really changes the output


def test_adapter_reloads_into_velotune(tiny_hf_llama, tmp_path):
    ours = _trained_like(get_peft_model(velotune_from_hf(tiny_hf_llama), r=4, lora_alpha=8))
    save_adapter(ours, tmp_path)
    again = load_adapter(velotune_from_hf(tiny_hf_llama), tmp_path)
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, ours.eval()(ids).logits)
