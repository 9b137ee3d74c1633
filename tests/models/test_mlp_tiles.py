"""The MLP in token tiles (long sequences) gives the untiled loss and gradients: no adapter (every weight
trained), LoRA on every projection (the fused MLP Function), LoRA on some (the composition), DoRA, Gemma's sandwich
norms, inside checkpointed layers; and its [tokens x intermediate] tensors exist for one tile at a time."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.conftest import tiny_llama_config
from tests.helpers import velotune_from_hf
from tests.models.test_families import hf_model
from velotune.lora.apply import get_peft_model
from velotune.models.decoder import MLP_AUTO_TILE, resolve_mlp_tile


def _llama(**kw):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return velotune_from_hf(LlamaForCausalLM(tiny_llama_config(**kw)))


def _grads(model, ids):
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


ADAPTERS = {
    "none": {},
    "lora-fused": {"r": 4, "lora_alpha": 8},
    "lora-attention-and-up": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]},
    "dora": {"r": 4, "lora_alpha": 8, "use_dora": True},
}


CASES = [("llama", ckpt, adapter) for adapter in ADAPTERS for ckpt in (False, True)]
CASES += [("gemma2", False, "none"), ("gemma2", True, "lora-fused")]  # sandwich norms: the MLP output is needed


@pytest.mark.parametrize(("case", "checkpointing", "adapter"), CASES)
def test_tiled_mlp_equals_untiled(case, checkpointing, adapter):
    base = _llama() if case == "llama" else velotune_from_hf(hf_model(case))
    if ADAPTERS[adapter]:
        get_peft_model(base, **ADAPTERS[adapter])
        with torch.no_grad():  # B = 0 would hide the adapter's own gradient path
            for name, p in base.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    base.gradient_checkpointing = checkpointing
    base.mlp_tile_tokens = None
    tiled = copy.deepcopy(base)
    tiled.mlp_tile_tokens = 7  # 48 tokens: six tiles of 7 and one of 6
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    loss_ref, grads_ref = _grads(base, ids)
    loss, grads = _grads(tiled, ids)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ref.keys() and grads
    for name, want in grads_ref.items():
        atol = 1e-5 * float(want.abs().max())
        torch.testing.assert_close(grads[name], want, rtol=1e-5, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


class _Shapes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("lora", [False, True])
def test_intermediate_tensors_exist_for_one_tile(lora):
    model = _llama(hidden_size=32, intermediate_size=96, num_hidden_layers=1)
    if lora:
        get_peft_model(model, r=4, lora_alpha=8)
    ids = torch.randint(0, 128, (1, 512))
    largest = {}
    for tile in (None, 128):
        model.mlp_tile_tokens = tile
        with _Shapes() as seen:
            _grads(model, ids)
        largest[tile] = max(s[0] if len(s) == 2 else s[0] * s[1] for s in seen.shapes if s and s[-1] == 96)
    assert largest[None] >= 512  # untiled: [512, 96] gate / up / activation
    assert largest[128] <= 128  # tiled: [128, 96] at most (weights are [96, 32])


def test_auto_tiles_long_sequences_only():
    assert resolve_mlp_tile("auto", 2 * MLP_AUTO_TILE - 1) is None
    assert resolve_mlp_tile("auto", 2 * MLP_AUTO_TILE) == MLP_AUTO_TILE
    assert resolve_mlp_tile(None, 10**6) is None
    assert resolve_mlp_tile(4096, 4096) is None and resolve_mlp_tile(4096, 4097) == 4096


def test_tiled_inference_equals_untiled():
    """Without gradients (a long prefill) tiles only bound the intermediates: same logits."""
    model = _llama().eval()
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.mlp_tile_tokens = None
        want = model(ids).logits
        model.mlp_tile_tokens = 5
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
