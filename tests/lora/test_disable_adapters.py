"""disable_adapters: the LoRA model with adapters switched off is the base model (DPO's free reference)."""

import torch

from tests.helpers import velotune_from_hf
from velotune.lora.apply import disable_adapters, get_peft_model, lora_layers


def _randomise_lora(model, seed=3):
    gen = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model).values():
        layer.lora_B.data.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.2)


def test_adapters_off_gives_the_base_models_logps_and_back_on_the_tuned_ones(tiny_hf_llama):
    base = velotune_from_hf(tiny_hf_llama)
    tuned = get_peft_model(velotune_from_hf(tiny_hf_llama), r=4, lora_alpha=8)
    _randomise_lora(tuned)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = -100
    expected = base(ids, labels=labels, return_logps=True).logps
    with_lora = tuned(ids, labels=labels, return_logps=True).logps
    assert not torch.allclose(with_lora, expected, rtol=1e-3)
    for grad in (False, True):  # no_grad (a reference pass) and grad (the fused LoRA MLP path) alike
        with torch.set_grad_enabled(grad), disable_adapters(tuned):
            off = tuned(ids, labels=labels, return_logps=True).logps
        torch.testing.assert_close(off, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tuned(ids, labels=labels, return_logps=True).logps, with_lora, rtol=0, atol=0)
