"""Activation checkpointing (plain and host-offloaded) changes memory, never the loss or the LoRA gradients."""

import copy

import pytest
import torch

from tests.helpers import velotune_from_hf
from velotune.lora.apply import get_peft_model, lora_layers


def _grads(model, ids):
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: m.lora_A.grad.clone() for n, m in lora_layers(model).items()}


@pytest.mark.parametrize(
    "mode",
    [True, pytest.param("offload", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))],
)
def test_checkpointing_keeps_loss_and_gradients(tiny_hf_llama, mode):
    device = "cuda" if mode == "offload" else "cpu"
    base = get_peft_model(velotune_from_hf(tiny_hf_llama), r=4, lora_alpha=8).to(device)
    for layer in lora_layers(base).values():
        torch.nn.init.normal_(layer.lora_B, std=0.05)
    ckpt = copy.deepcopy(base)
    ckpt.gradient_checkpointing = mode
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    loss_ref, grads_ref = _grads(base, ids)
    loss, grads = _grads(ckpt, ids)
    torch.testing.assert_close(loss, loss_ref)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-6)
