"""DoRA against PEFT's use_dora on the same tiny Llama, base weights and adapter values: logits, loss and the
gradients of every A, B and magnitude, for a 32-bit base (with and without biases), an NF4 base (PEFT on the
dequantized weights), adapter dropout in training mode, a bf16 model at bf16 tolerance, and (GPU) the decoder with
its Triton kernels."""

import pytest
import torch
from transformers import LlamaForCausalLM

from tests.conftest import tiny_llama_config
from tests.helpers import velotune_from_hf
from velotune.quant.apply import quantize_model


def _batch():
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :6] = -100
    return ids, labels


def _graph_nodes(root: torch.Tensor) -> set[str]:
    seen, stack = set(), [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(fn for fn, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


def _assert_step_matches(ours, theirs, pairs, rtol=1e-5, atol=1e-6):
    """Loss, every adapter gradient and the logits equal; a bf16 model (rtol >= 1e-2) is held to a relative error
    of the whole gradient tensor, as elementwise bf16 rounding makes small entries noisy."""
    ids, labels = _batch()
    ref = theirs(input_ids=ids, labels=labels)
    ref.loss.backward()
    out = ours(ids, labels=labels)
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=rtol, atol=atol)
    for name, mine, their in pairs:
        if rtol < 1e-2:
            torch.testing.assert_close(mine.grad, their.grad, rtol=rtol, atol=atol, msg=name)
        else:
            their_grad = their.grad.float()
            assert (mine.grad - their_grad).norm() <= 3 * rtol * their_grad.norm(), name
    with torch.no_grad():
        mine, their = ours(ids).logits.float(), theirs(input_ids=ids).logits.float()
        torch.testing.assert_close(mine, their, rtol=rtol, atol=10 * atol)
    return out.loss


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "q-k-v-o-mlp-bias"])
def test_dora_logits_loss_and_gradients_equal_peft(make_dora_twin, bias):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(tiny_llama_config(attention_bias=bias, mlp_bias=bias)).eval()
    ours, theirs, pairs = make_dora_twin(velotune_from_hf(hf), hf, r=4, lora_alpha=8)
    assert len(pairs) == 3 * 7 * 2  # A, B and m; 7 projections; 2 layers
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {name for name, _, _ in pairs}
    loss = _assert_step_matches(ours, theirs, pairs)
    assert {"DoRALinearFunctionBackward", "LoRAMLPFunctionBackward"} <= _graph_nodes(loss)  # the fast paths ran


def test_dora_on_an_nf4_base_equals_peft_on_the_dequantized_weights(make_dora_twin, tiny_hf_llama):
    ours = quantize_model(velotune_from_hf(tiny_hf_llama), "nf4", compute_dtype=torch.float32, progress=False)
    with torch.no_grad():  # PEFT's base: the weights the NF4 model computes with
        for name, module in ours.named_modules():
            if hasattr(module, "dequantize"):
                tiny_hf_llama.get_submodule(name).weight.copy_(module.dequantize(torch.float32))
    ours, theirs, pairs = make_dora_twin(ours, tiny_hf_llama, r=4, lora_alpha=8)
    loss = _assert_step_matches(ours, theirs, pairs)
    assert "LoRAMLPFunctionBackward" in _graph_nodes(loss)


def test_dora_with_dropout_follows_peft_in_training(make_dora_twin, tiny_hf_llama):
    """PEFT's DoRA with dropout: x W^T + (g - 1) dropout(x) W^T + g s dropout(x) A^T B^T. The same seed gives both
    sides the same masks (the projections run in the same order)."""
    ours = velotune_from_hf(tiny_hf_llama)
    ours, theirs, pairs = make_dora_twin(ours, tiny_hf_llama, r=4, lora_alpha=8, lora_dropout=0.3)
    ours.train()
    theirs.train()
    ids, labels = _batch()
    torch.manual_seed(11)
    ref = theirs(input_ids=ids, labels=labels).loss
    ref.backward()
    torch.manual_seed(11)
    out = ours(ids, labels=labels).loss
    out.backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for name, mine, their in pairs:
        torch.testing.assert_close(mine.grad, their.grad, rtol=1e-5, atol=1e-6, msg=name)
    torch.manual_seed(12)
    assert not torch.allclose(ours(ids, labels=labels).loss, out)  # other masks: dropout is really on


def test_dora_in_bf16_matches_peft_at_bf16_tolerance(make_dora_twin, tiny_hf_llama):
    ours = velotune_from_hf(tiny_hf_llama, dtype=torch.bfloat16)
    ours, theirs, pairs = make_dora_twin(ours, tiny_hf_llama.to(torch.bfloat16), r=4, lora_alpha=8)
    _assert_step_matches(ours, theirs, pairs, rtol=1e-2, atol=2e-3)


@pytest.mark.gpu
def test_dora_step_with_kernels_matches_peft(triton_device, make_dora_twin, tiny_hf_llama):
    ours = velotune_from_hf(tiny_hf_llama).to(triton_device)
    ours, theirs, pairs = make_dora_twin(ours, tiny_hf_llama.to(triton_device), r=4, lora_alpha=8)
    ids, labels = (t.to(triton_device) for t in _batch())
    ref = theirs(input_ids=ids, labels=labels).loss
    ref.backward()
    out = ours(ids, labels=labels).loss
    kernels = {"RMSNormFunctionBackward", "RopeFunctionBackward", "LinearCrossEntropyFunctionBackward"}
    assert kernels | {"DoRALinearFunctionBackward", "LoRAMLPFunctionBackward"} <= _graph_nodes(out)
    out.backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for name, mine, their in pairs:
        torch.testing.assert_close(mine.grad, their.grad, rtol=1e-4, atol=1e-5, msg=name)
