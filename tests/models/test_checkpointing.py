"""Activation checkpointing (kept on the device, or offloaded to host) changes memory, never the loss or the
gradients: LoRA on every projection or on some, LoRA dropout (the recomputation replays its masks), a trainable
down projection, Gemma's sandwich norms. The recomputation skips the down projection's base matmul."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.helpers import velotune_from_hf
from tests.models.test_families import hf_model
from velotune.lora.apply import get_peft_model, lora_layers

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="offload needs CUDA")


def _grads(model, ids):
    model.train()
    torch.manual_seed(7)  # LoRA dropout draws the same masks in both runs
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _compare(base, mode, device, t=16, fraction=1.0):
    ckpt = copy.deepcopy(base)
    ckpt.gradient_checkpointing = mode
    ckpt.checkpoint_layers = fraction
    ids = torch.randint(0, 128, (2, t), generator=torch.Generator().manual_seed(0)).to(device)
    loss_ref, grads_ref = _grads(base, ids)
    loss, grads = _grads(ckpt, ids)
    torch.testing.assert_close(loss, loss_ref)
    assert grads.keys() == grads_ref.keys() and grads
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-6, msg=name)


def _lora(model, **kw):
    get_peft_model(model, r=4, lora_alpha=8, **kw)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.05)
    return model


@pytest.mark.parametrize("mode", [True, pytest.param("offload", marks=CUDA)])
@pytest.mark.parametrize(
    "variant", ["all", "attention_only", "dropout", "trainable_down", "no_down_lora_first_layer_frozen"]
)
def test_checkpointing_keeps_loss_and_gradients(tiny_hf_llama, mode, variant):
    device = "cuda" if mode == "offload" else "cpu"
    model = velotune_from_hf(tiny_hf_llama)
    kw = {
        "all": {},
        "attention_only": {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "dropout": {"lora_dropout": 0.3},
        "trainable_down": {"target_modules": ["q_proj", "v_proj"]},
        "no_down_lora_first_layer_frozen": {"target_modules": ["gate_proj", "up_proj"]},
    }[variant]
    _lora(model, **kw)
    if variant == "trainable_down":
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.requires_grad_(True)
    _compare(model.to(device), mode, device)


@pytest.mark.parametrize("mode", [True, pytest.param("offload", marks=CUDA)])
@pytest.mark.parametrize("fraction", [0.5, 0.25])
def test_checkpointing_some_layers_keeps_loss_and_gradients(tiny_hf_llama, mode, fraction):
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config

    torch.manual_seed(0)
    hf = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=4)).eval()
    device = "cuda" if mode == "offload" else "cpu"
    _compare(_lora(velotune_from_hf(hf)).to(device), mode, device, fraction=fraction)


def test_checkpointed_layers_are_spread_evenly():
    from velotune.models.checkpointing import checkpointed_layers

    assert checkpointed_layers(8, 0.5) == [False, True] * 4
    assert checkpointed_layers(4, 0.25) == [False, False, False, True]
    assert checkpointed_layers(42, 0.5).count(True) == 21 and all(checkpointed_layers(5, 1.0))


@pytest.mark.parametrize("case", ["gemma2", "qwen2"])
def test_checkpointing_other_families(case):
    _compare(_lora(velotune_from_hf(hf_model(case))), True, "cpu", t=20)


class _CountMatmuls(TorchDispatchMode):
    """Counts matmuls that read a given weight (as either operand)."""

    def __init__(self, weights):
        super().__init__()
        self.ptrs = {w.data_ptr() for w in weights}
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.linear):
            for a in args:
                if isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() in self.ptrs:
                    self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", [False, True])
def test_recomputation_skips_the_down_projection_matmul(tiny_hf_llama, mode):
    model = _lora(velotune_from_hf(tiny_hf_llama))
    model.gradient_checkpointing = mode
    model.train()
    downs = [layer.mlp.down_proj.base_layer.weight for layer in model.model.layers]
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with _CountMatmuls(downs) as counter:
        model(ids, labels=ids).loss.backward()
    # forward (1 per layer) + backward dx (1 per layer); the recomputation adds none
    assert counter.count == 2 * len(downs)
