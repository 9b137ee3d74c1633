"""The decoder's label log-probabilities (return_logps, for DPO/ORPO/GRPO) against log_softmax over its full logits:
values, row sums and counts, the loss computed from them, and gradients for LoRA and full fine-tuning, on tiny random
Llama and Gemma 2 (final-logit soft-cap) models (fp32)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_llama_config
from tests.helpers import velotune_from_hf
from tests.models.test_families import SMALL, randomized_hf_model
from velotune.lora.apply import get_peft_model, lora_layers
from velotune.models.decoder import shifted_targets

VOCAB = SMALL["vocab_size"]


def _gemma2():
    from transformers import Gemma2Config

    # a cap of 0.5 bends these random logits (|z| up to ~1) strongly, so a missing or doubled cap shows
    config = Gemma2Config(**SMALL, head_dim=16, sliding_window=8, final_logit_softcapping=0.5, pad_token_id=0)
    return velotune_from_hf(randomized_hf_model(config))


def _llama(**overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return velotune_from_hf(LlamaForCausalLM(tiny_llama_config(**overrides)))


MODELS = {"llama": _llama, "llama-tied": lambda: _llama(tie_word_embeddings=True), "gemma2": _gemma2}


def _batch(device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (3, 19), generator=torch.Generator().manual_seed(1)).to(device)
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt
    labels[1, 11:] = -100  # trailing padding
    labels[2] = -100  # a row without targets
    return ids, labels


def _reference_token_logps(model, ids, labels, position_ids=None) -> torch.Tensor:
    """log_softmax over the model's full (soft-capped) logits at the shifted labels, 0 where there is no target."""
    logits = model(ids, position_ids=position_ids).logits[:, :-1]  # [B, T-1, V]
    targets = shifted_targets(labels, position_ids)
    logps = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return logps.masked_fill(targets == -100, 0.0)


def _objective(logps: torch.Tensor) -> torch.Tensor:
    """A non-linear function of per-row log-probabilities (as DPO's), so rows get different gradients."""
    w = torch.tensor([0.7, -1.3, 0.4], device=logps.device)
    return torch.sigmoid(0.1 * logps * w).sum()


def _with_lora(model):
    model = get_peft_model(model, r=4, lora_alpha=8)
    torch.manual_seed(3)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.05)  # B = 0 at init would leave A without gradient
    return model


@pytest.mark.parametrize("name", list(MODELS))
def test_logps_equal_log_softmax_of_full_logits(name, device="cpu"):
    model = MODELS[name]().to(device)
    ids, labels = _batch(device)
    with torch.no_grad():
        out = model(ids, labels=labels, return_logps=True)
        ref = _reference_token_logps(model, ids, labels)
        plain = model(ids, labels=labels)
    assert out.token_logps.dtype == torch.float32 and out.token_logps.shape == (3, 18)
    torch.testing.assert_close(out.token_logps, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logps, ref.sum(-1), rtol=1e-5, atol=1e-5)
    assert out.num_targets_per_row.tolist() == (labels[:, 1:] != -100).sum(-1).tolist()
    assert out.logps[2] == 0 and out.num_targets_per_row[2] == 0
    # the loss comes from the same log-probabilities and equals the plain chunked loss
    torch.testing.assert_close(out.loss, plain.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.loss, -ref.sum() / out.num_targets_per_row.sum(), rtol=1e-5, atol=1e-6)
    assert out.num_targets == plain.num_targets


def test_packed_row_has_no_logp_across_the_boundary():
    model = _llama()
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    pos = torch.cat([torch.arange(12), torch.arange(8)])[None]
    with torch.no_grad():
        out = model(ids, labels=labels, position_ids=pos, return_logps=True)
        ref = _reference_token_logps(model, ids, labels, pos)
    assert out.token_logps[0, 11] == 0  # the first token of the second example is not predicted from the first
    assert out.num_targets_per_row.tolist() == [18]
    torch.testing.assert_close(out.token_logps, ref, rtol=1e-5, atol=1e-5)


def _grads(model, params, use_logps: bool) -> list[torch.Tensor]:
    ids, labels = _batch(str(model.device))
    if use_logps:
        out = model(ids, labels=labels, return_logps=True)
        value = _objective(out.logps) + out.loss
    else:
        logps = _reference_token_logps(model, ids, labels)
        value = _objective(logps.sum(-1)) - logps.sum() / (labels[:, 1:] != -100).sum()
    return list(torch.autograd.grad(value, params))


def _assert_same_grads(model, params):
    for got, want in zip(_grads(model, params, True), _grads(model, params, False), strict=True):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_lora_gradients_of_logps_equal_those_through_full_logits(name):
    model = _with_lora(MODELS[name]())
    _assert_same_grads(model, [p for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("name", list(MODELS))
def test_full_finetuning_gradients_of_logps_equal_those_through_full_logits(name):
    """Head weight trains too: its gradient is recomputed chunk by chunk in backward (tied: shared with embeddings)."""
    model = MODELS[name]()
    _assert_same_grads(model, list(model.parameters()))


def test_return_logps_without_labels_is_refused():
    ids, _ = _batch()
    with pytest.raises(ValueError, match="needs labels"):
        _llama()(ids, return_logps=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_logps_and_their_gradients_on_cuda(name):
    """The same checks with every Triton kernel in the path (fp32): values, LoRA and full fine-tuning gradients."""
    test_logps_equal_log_softmax_of_full_logits(name, device="cuda")
    model = _with_lora(MODELS[name]()).cuda()
    _assert_same_grads(model, [p for p in model.parameters() if p.requires_grad])
    model = MODELS[name]().cuda()
    _assert_same_grads(model, list(model.parameters()))
