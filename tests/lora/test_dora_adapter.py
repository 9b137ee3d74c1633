"""DoRA adapters in PEFT's format both ways (velotune's load in peft.PeftModel, PEFT's load in velotune) with equal
logits, and the merged model (velotune's merge, saved in HF layout and loaded by transformers) equal to the adapter
model and to PEFT's own merge."""

import copy
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.helpers import velotune_from_hf
from velotune.export.hf import save_hf
from velotune.lora.apply import lora_layers, merge_lora
from velotune.lora.peft_format import load_adapter, save_adapter
from velotune.quant.apply import quantize_model

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def _logits(model) -> torch.Tensor:
    """A velotune model's logits on IDS."""
    with torch.no_grad():
        return model.eval()(IDS).logits


def _hf_logits(model) -> torch.Tensor:
    """A transformers (or PEFT) model's logits on IDS."""
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def test_velotune_dora_adapter_loads_in_peft(make_dora_twin, tiny_hf_llama, tmp_path):
    peft_side = copy.deepcopy(tiny_hf_llama)  # the twin's PEFT model is dropped: PEFT loads our file instead
    ours, _, _ = make_dora_twin(velotune_from_hf(tiny_hf_llama), peft_side, r=8, lora_alpha=16, use_rslora=True)
    save_adapter(ours, tmp_path, base_model="tiny")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector" in keys and len(keys) == 3 * 7 * 2
    theirs = PeftModel.from_pretrained(tiny_hf_llama, str(tmp_path)).eval()
    ref = _hf_logits(theirs)
    torch.testing.assert_close(_logits(ours), ref, rtol=1e-5, atol=1e-5)
    with theirs.disable_adapter():
        assert not torch.allclose(ref, _hf_logits(theirs), atol=1e-3)  # the adapter really changes the output


def test_peft_dora_adapter_loads_in_velotune(make_dora_twin, tiny_hf_llama, tmp_path):
    fresh = velotune_from_hf(tiny_hf_llama)
    _, theirs, _ = make_dora_twin(velotune_from_hf(tiny_hf_llama), tiny_hf_llama, r=4, lora_alpha=8)
    theirs.save_pretrained(str(tmp_path))
    ours = load_adapter(fresh, tmp_path)
    assert all(layer.use_dora for layer in lora_layers(ours).values())
    torch.testing.assert_close(_logits(ours), _hf_logits(theirs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("base", ["fp32", "nf4"])
def test_merged_dora_model_equals_the_adapter_model_and_peft_merge(make_dora_twin, tiny_hf_llama, tmp_path, base):
    ours = velotune_from_hf(tiny_hf_llama)
    if base == "nf4":
        ours = quantize_model(ours, "nf4", compute_dtype=torch.float32, progress=False)
        with torch.no_grad():  # PEFT's base: the weights the NF4 model computes with
            for name, module in ours.named_modules():
                if hasattr(module, "dequantize"):
                    tiny_hf_llama.get_submodule(name).weight.copy_(module.dequantize(torch.float32))
    ours, theirs, _ = make_dora_twin(ours, tiny_hf_llama, r=4, lora_alpha=8)
    with_adapter = _logits(ours)
    merged = merge_lora(ours)
    assert not lora_layers(merged)
    torch.testing.assert_close(_logits(merged), with_adapter, rtol=1e-5, atol=1e-5)
    save_hf(merged, None, tmp_path / "m", dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    torch.testing.assert_close(_hf_logits(hf), with_adapter, rtol=1e-5, atol=1e-5)
    peft_merged = theirs.merge_and_unload().state_dict()
    for name, value in merged.state_dict().items():
        torch.testing.assert_close(value, peft_merged[name], rtol=1e-5, atol=1e-6, msg=name)
