"""The decoder with every Triton kernel in its path against PEFT on Hugging Face's Llama: loss and LoRA gradients."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from peft import get_peft_model as peft_get_peft_model

from tests.helpers import velotune_from_hf
from velotune.lora.apply import ALL_PROJECTIONS, get_peft_model, lora_layers

KERNEL_NODES = {
    "RMSNormFunctionBackward",
    "RopeFunctionBackward",
    "LoRAMLPFunctionBackward",  # gate, up, the Triton GLU and down in one Function
    "LoRALinearFunctionBackward",
    "LinearCrossEntropyFunctionBackward",
}


def _graph_nodes(root: torch.Tensor) -> set[str]:
    seen, stack, names = set(), [root.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return names


@pytest.mark.gpu
def test_lora_step_with_kernels_matches_peft(triton_device, tiny_hf_llama):
    ours = velotune_from_hf(tiny_hf_llama).to(triton_device)
    peft_model = peft_get_peft_model(
        tiny_hf_llama.to(triton_device),
        LoraConfig(r=4, lora_alpha=8, target_modules=list(ALL_PROJECTIONS), lora_dropout=0.0),
    )
    get_peft_model(ours, r=4, lora_alpha=8)
    ours.model.norm.weight.requires_grad_(True)  # one trainable norm weight: RMSNorm's weight-gradient path
    peft_norm = peft_model.base_model.model.model.norm.weight.requires_grad_(True)
    torch.manual_seed(5)
    peft_params = dict(peft_model.named_parameters())
    for name, layer in lora_layers(ours).items():
        for part in ("lora_A", "lora_B"):
            value = torch.randn_like(getattr(layer, part)) * 0.1
            getattr(layer, part).data.copy_(value)
            peft_params[f"base_model.model.{name}.{part}.default.weight"].data.copy_(value)
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0)).to(triton_device)
    labels = ids.clone()
    labels[:, :6] = -100
    ref = peft_model(input_ids=ids, labels=labels).loss
    ref.backward()
    out = ours(ids, labels=labels).loss
    assert KERNEL_NODES <= _graph_nodes(out)  # every kernel ran
    out.backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.model.norm.weight.grad, peft_norm.grad, rtol=1e-4, atol=1e-5)
    for name, layer in lora_layers(ours).items():
        for part in ("lora_A", "lora_B"):
            ref_grad = peft_params[f"base_model.model.{name}.{part}.default.weight"].grad
            torch.testing.assert_close(getattr(layer, part).grad, ref_grad, rtol=1e-4, atol=1e-5)
