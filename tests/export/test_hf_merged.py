"""The merged model in Hugging Face layout loads in transformers with the logits of velotune's merged model."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.helpers import velotune_from_hf
from velotune.export.hf import save_hf
from velotune.lora.apply import get_peft_model, lora_layers, merge_lora


@pytest.mark.parametrize("shard_bytes", [2**40, 40_000], ids=["single", "sharded"])
def test_merged_model_roundtrip_through_transformers(tiny_hf_llama, tmp_path, shard_bytes):
    model = get_peft_model(velotune_from_hf(tiny_hf_llama), r=4, lora_alpha=8)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.05)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with_lora = model(ids).logits
        merged = merge_lora(model)
        ours = merged(ids).logits
    torch.testing.assert_close(ours, with_lora, rtol=1e-5, atol=1e-5)
    save_hf(merged, None, tmp_path / "m", dtype=torch.float32, max_shard_bytes=shard_bytes)
    if shard_bytes < 2**40:
        assert (tmp_path / "m" / "model.safetensors.index.json").exists()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
