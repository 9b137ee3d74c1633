"""Quantize-while-loading and pre-quantized bitsandbytes checkpoints, through the model loader."""

import json

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import tiny_llama_config
from tests.quant.conftest import spec_bnb_tensors, spec_quantize
from velotune.errors import ModelLoadError
from velotune.lora.apply import ALL_PROJECTIONS
from velotune.quant.int8 import Linear8bit
from velotune.quant.loading import load_quantized
from velotune.quant.nf4 import Linear4bit, quantize


@pytest.fixture
def tiny_dir(tmp_path):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(tiny_llama_config(hidden_size=128, intermediate_size=192, attention_bias=True))
    hf.save_pretrained(tmp_path / "fp")
    return tmp_path / "fp", hf


def _bnb_checkpoint(src_model, out):
    """The tiny model written in bitsandbytes' 4-bit layout by the independent spec implementation."""
    tensors, cfg = {}, src_model.config.to_dict()
    for name, t in src_model.state_dict().items():
        layer = name.rpartition(".")[0]
        if ".layers." in name and layer.rpartition(".")[2] in ALL_PROJECTIONS:
            if name.endswith(".weight"):
                bias = src_model.state_dict().get(layer + ".bias")
                tensors.update(spec_bnb_tensors(spec_quantize(t), layer + ".", bias))
            continue
        tensors[name] = t.contiguous()
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"))
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_nf4_loading_quantizes_every_projection_and_stays_close(tiny_dir):
    path, hf = tiny_dir
    model, _ = load_quantized(path, "nf4", torch.float32, with_tokenizer=False)
    layers = [m for n, m in model.named_modules() if n.rpartition(".")[2] in ALL_PROJECTIONS]
    assert len(layers) == 14 and all(isinstance(m, Linear4bit) for m in layers)
    assert model.model.layers[0].self_attn.q_proj.bias is not None  # biases travel with their weights
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, ref = model(ids).logits, hf(input_ids=ids).logits
        for name, module in hf.named_modules():  # transformers with every projection replaced by its NF4 value
            if name.rpartition(".")[2] in ALL_PROJECTIONS:
                module.weight.copy_(quantize(module.weight).dequantize(torch.float32))
        exact = hf(input_ids=ids).logits
    torch.testing.assert_close(ours, exact, rtol=1e-5, atol=1e-5)
    rel = (ours - ref).norm() / ref.norm()
    assert rel < 0.3, f"NF4 logits relative error {rel:.3f} on random weights"


def test_int8_loading_is_closer_than_nf4(tiny_dir):
    path, hf = tiny_dir
    model, _ = load_quantized(path, "int8", torch.float32, with_tokenizer=False)
    assert isinstance(model.model.layers[1].mlp.down_proj, Linear8bit)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        rel = (model(ids).logits - hf(input_ids=ids).logits).norm() / hf(input_ids=ids).logits.norm()
    assert rel < 0.02


def test_bnb_4bit_checkpoint_loads_with_logits_of_our_quantization(tiny_dir, tmp_path):
    path, hf = tiny_dir
    bnb_dir = _bnb_checkpoint(hf, tmp_path / "bnb")
    pre, _ = load_quantized(bnb_dir, None, torch.float32, with_tokenizer=False)
    ours, _ = load_quantized(path, "nf4", torch.float32, with_tokenizer=False)
    assert pre.quantization == "nf4"
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(pre(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)


def test_pre_quantized_checkpoint_without_4bit_loading_says_how(tiny_dir, tmp_path):
    from velotune.models.load import load_model

    _, hf = tiny_dir
    bnb_dir = _bnb_checkpoint(hf, tmp_path / "bnb")
    with pytest.raises(ModelLoadError, match="load_in_4bit"):
        load_model(bnb_dir, torch.float32, with_tokenizer=False)


@pytest.mark.slow  # ~2 min on 2 cores; the 4-bit layout and loading are checked on small tensors above
def test_4bit_smollm2_answers_and_keeps_perplexity(smollm2):
    """NF4 re-quantizes the GGUF's Q4_1 values (two 4-bit roundings of a 135M model): measured 2026-11-23,
    perplexity 23.29 -> 37.41 on this text; the answer stays right."""
    from tests.models.test_smollm2 import TEXT
    from velotune.data import render_prompt
    from velotune.models.generate import generate, stop_token_ids

    base, tok = smollm2
    q4, _ = load_quantized(None, "nf4", torch.float32, with_tokenizer=False)
    prompt = render_prompt([{"role": "user", "content": "What is the capital of France?"}], tok)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert "Paris" in tok.decode(generate(q4, ids, max_new_tokens=12, eos_token_id=stop_token_ids(tok)))
    text = torch.tensor([tok(TEXT)["input_ids"]])
    with torch.no_grad():
        ppl_base = torch.exp(base(text, labels=text).loss).item()
        ppl_q4 = torch.exp(q4(text, labels=text).loss).item()
    print(f"perplexity: base {ppl_base:.2f}, nf4 {ppl_q4:.2f}")
    assert ppl_q4 < ppl_base * 2.0
