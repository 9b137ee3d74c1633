"""A packed batch (document-masked attention, no [T x T] mask) gives every document the loss and the gradients it
has when run alone, for every family: sliding windows crossed inside documents (Mistral, Qwen2, Gemma 2/3),
attention soft-caps (Gemma 2), padding as a trailing segment. And a 2-document row of 2048 tokens allocates no
tensor of T x T / 4 elements or more, forward and backward."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.conftest import tiny_llama_config
from tests.helpers import velotune_from_hf
from tests.models.test_families import FAMILY_CASES, hf_model
from velotune.data import collate
from velotune.models.decoder import build_masks

LENGTHS = (13, 20, 7, 9, 16)  # windows of 8 are crossed in four of them; packed into rows of 40 and 25 + padding


def _examples(vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    out = []
    for n in LENGTHS:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    return out


def _loss_and_grads(model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    keys = ("input_ids", "labels", "attention_mask", "position_ids")
    loss = model(**{k: batch[k].to(model.device) for k in keys}, num_items_in_batch=1).loss  # sum over targets
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _model(case: str):
    if case == "llama":
        torch.manual_seed(0)
        from transformers import LlamaForCausalLM

        return velotune_from_hf(LlamaForCausalLM(tiny_llama_config()).eval())
    return velotune_from_hf(hf_model(case))


CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])  # CUDA: FlexAttention block masks
@pytest.mark.parametrize("case", ["llama", *FAMILY_CASES, "qwen2-sliding"])
def test_packed_documents_equal_each_document_alone(case, device):
    model = _model(case).to(device)
    examples = _examples(model.config.vocab_size)
    packed = collate(examples, pad_id=0, packing=True, max_seq_length=40)
    assert packed["input_ids"].shape == (2, 40) and not packed["attention_mask"].all()  # padding in row 2
    loss, grads = _loss_and_grads(model, packed)
    want_loss, want = torch.zeros((), device=device), {}
    for e in examples:
        alone, g = _loss_and_grads(model, collate([e], pad_id=0))
        want_loss += alone
        for name, grad in g.items():
            want[name] = want.get(name, 0) + grad
    tol = 1e-5 if device == "cpu" else 1e-4  # FlexAttention's fp32 kernel sums in its own tile order
    torch.testing.assert_close(loss, want_loss, rtol=tol, atol=tol)
    assert grads.keys() == want.keys()
    for name in grads:  # fp32 sums in another order: rtol, and atol relative to the tensor's largest gradient
        atol = tol * float(want[name].abs().max())
        torch.testing.assert_close(grads[name], want[name], rtol=tol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor (elements) any op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.numel, self.where = 0, ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.where = t.numel(), f"{func}: {tuple(t.shape)}"
        return out


@pytest.mark.parametrize("window", [None, 256], ids=["llama", "mistral-window"])
def test_two_document_row_never_allocates_t_by_t(window):
    from transformers import LlamaForCausalLM, MistralForCausalLM

    t = 2048
    torch.manual_seed(0)
    dims = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1)
    cfg = tiny_llama_config(**dims, num_hidden_layers=1, max_position_embeddings=t)
    if window:
        from transformers import MistralConfig

        cfg = MistralConfig(**cfg.to_dict() | {"model_type": "mistral", "sliding_window": window})
    model = velotune_from_hf((MistralForCausalLM if window else LlamaForCausalLM)(cfg)).train()
    assert model.config.sliding_window == window  # documents of 1024 cross the window: query blocks of 256
    ids = torch.randint(0, 128, (1, t))
    position_ids = torch.cat([torch.arange(t // 2), torch.arange(t - t // 2)])[None]  # two documents
    with _LargestAllocation() as seen:
        model(ids, position_ids=position_ids, labels=ids).loss.backward()
    assert seen.numel < t * t // 4, seen.where  # a document's own [T/2 x T/2] would be caught too
    with _LargestAllocation() as dense:  # the detector sees the boolean mask a KV-cache forward would build
        build_masks(model.config, position_ids, None, t, t)
    assert dense.numel >= t * t


@pytest.mark.parametrize("case", ["llama", "mistral", "gemma2"])
def test_left_padding_is_a_document_real_tokens_never_see(case):
    """A left-padded row (GRPO-style scoring) gives its real tokens the logits they have alone."""
    model = _model(case)
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=position_ids).logits
        alone = model(ids[1:, 9:]).logits
        first = model(ids[:1]).logits
    torch.testing.assert_close(out[1, 9:], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0], first[0], rtol=1e-5, atol=1e-5)
