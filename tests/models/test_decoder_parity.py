"""velotune's decoder against transformers' LlamaForCausalLM on the same random weights (fp32)."""

import pytest
import torch
from transformers import LlamaForCausalLM

from tests.conftest import tiny_llama_config
from tests.helpers import velotune_from_hf


def _ids(b=2, t=24, vocab=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, t), generator=g)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_word_embeddings": True},
        {"attention_bias": True, "mlp_bias": True},
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            "rope_theta": 500000.0,
        },
    ],
    ids=["plain", "tied", "bias", "llama3-rope"],
)
def test_logits_and_loss_equal_transformers(overrides):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(tiny_llama_config(**overrides)).eval()
    ours = velotune_from_hf(hf)
    ids = _ids()
    labels = ids.clone()
    labels[:, :5] = -100
    with torch.no_grad():
        ref = hf(input_ids=ids, labels=labels)
        out = ours(ids, labels=labels, return_logits=True)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)


def test_padded_batch_matches_transformers_on_real_tokens(tiny_hf_llama):
    ours = velotune_from_hf(tiny_hf_llama)
    ids = _ids(t=16)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0  # right padding on the second row
    with torch.no_grad():
        ref = tiny_hf_llama(input_ids=ids, attention_mask=mask).logits
        out = ours(ids, attention_mask=mask).logits
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1, :10], ref[1, :10], rtol=1e-5, atol=1e-5)


def test_packed_sequences_equal_separate_runs(tiny_hf_llama):
    """Two examples packed into one row with restarting position ids give each example's own logits."""
    ours = velotune_from_hf(tiny_hf_llama)
    a, b = _ids(1, 9, seed=2), _ids(1, 7, seed=3)
    packed = torch.cat([a, b], dim=1)
    pos = torch.cat([torch.arange(9), torch.arange(7)])[None]
    with torch.no_grad():
        out = ours(packed, position_ids=pos).logits
        la, lb = ours(a).logits, ours(b).logits
    torch.testing.assert_close(out[:, :9], la, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 9:], lb, rtol=1e-5, atol=1e-5)


def test_kv_cache_generation_matches_full_forward(tiny_hf_llama):
    from velotune.models.decoder import KVCache

    ours = velotune_from_hf(tiny_hf_llama)
    ids = _ids(1, 12)
    cache = KVCache(ours.config.num_layers)
    with torch.no_grad():
        full = ours(ids).logits
        first = ours(ids[:, :8], cache=cache).logits
        steps = [ours(ids[:, i : i + 1], cache=cache).logits for i in range(8, 12)]
    torch.testing.assert_close(first, full[:, :8], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 8:], rtol=1e-5, atol=1e-5)
