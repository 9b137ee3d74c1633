"""LoRA gradients against PEFT on the same base and adapter weights."""

import torch
from peft import LoraConfig
from peft import get_peft_model as peft_get_peft_model

from tests.helpers import velotune_from_hf
from velotune.lora.apply import ALL_PROJECTIONS, get_peft_model, lora_layers


def test_lora_loss_and_gradients_equal_peft(tiny_hf_llama):
    ours = velotune_from_hf(tiny_hf_llama)
    peft_model = peft_get_peft_model(
        tiny_hf_llama, LoraConfig(r=4, lora_alpha=8, target_modules=list(ALL_PROJECTIONS), lora_dropout=0.0)
    )
    get_peft_model(ours, r=4, lora_alpha=8)
    torch.manual_seed(5)
    peft_params = dict(peft_model.named_parameters())
    for name, layer in lora_layers(ours).items():
        for part in ("lora_A", "lora_B"):
            value = torch.randn_like(getattr(layer, part)) * 0.1
            getattr(layer, part).data.copy_(value)
            peft_params[f"base_model.model.{name}.{part}.default.weight"].data.copy_(value)
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :6] = -100
    ref = peft_model(input_ids=ids, labels=labels).loss
    ref.backward()
    out = ours(ids, labels=labels).loss
    out.backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 7 * 2  # A and B, 7 projections, 2 layers: the base is frozen
    for name, layer in lora_layers(ours).items():
        for part in ("lora_A", "lora_B"):
            ref_grad = peft_params[f"base_model.model.{name}.{part}.default.weight"].grad
            torch.testing.assert_close(getattr(layer, part).grad, ref_grad, rtol=1e-5, atol=1e-6)
