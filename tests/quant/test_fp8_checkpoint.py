"""Published FP8 checkpoints (DeepSeek-V3 / Qwen FP8 layout): config.json `quantization_config` from transformers'
FineGrainedFP8Config, safetensors `weight` (float8_e4m3fn) + `weight_scale_inv` (float32 per 128 x 128 block),
written here block by block, independently of velotune's quantizer, then loaded as stored."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import tiny_llama_config
from velotune.errors import ConfigError, QuantizationError
from velotune.lora.apply import ALL_PROJECTIONS
from velotune.quant.apply import dequantize_model
from velotune.quant.fp8 import LinearFP8
from velotune.quant.loading import load_quantized


def _spec_block_fp8(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (e4m3 [out, in], scale_inv [ceil(out/128), ceil(in/128)]), one block at a time."""
    rows, cols = w.shape
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scale = torch.empty(-(-rows // block), -(-cols // block))
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = w[i * block : (i + 1) * block, j * block : (j + 1) * block].float()
            scale[i, j] = tile.abs().max() / 448.0
            q[i * block : (i + 1) * block, j * block : (j + 1) * block] = (tile / scale[i, j]).to(torch.float8_e4m3fn)
    return q, scale


@pytest.fixture
def fp8_checkpoint(tmp_path):
    """(directory, transformers model, the same model with every projection replaced by its dequantized FP8 value)."""
    from transformers import FineGrainedFP8Config, LlamaForCausalLM

    torch.manual_seed(0)
    # 192 x 320 weights: partial 128-blocks along both axes
    hf = LlamaForCausalLM(tiny_llama_config(hidden_size=192, intermediate_size=320, attention_bias=True)).eval()
    deq = LlamaForCausalLM(hf.config).eval()
    deq.load_state_dict(hf.state_dict())
    tensors = {}
    for name, t in hf.state_dict().items():
        layer = name.rpartition(".")[0]
        if name.endswith(".weight") and ".layers." in name and layer.rpartition(".")[2] in ALL_PROJECTIONS:
            q, scale = _spec_block_fp8(t)
            tensors[name], tensors[layer + ".weight_scale_inv"] = q, scale
            with torch.no_grad():
                deq.get_submodule(layer).weight.copy_(
                    q.float() * scale.repeat_interleave(128, 0)[: t.shape[0]].repeat_interleave(128, 1)[:, : t.shape[1]]
                )
        else:
            tensors[name] = t.contiguous()
    out = tmp_path / "fp8"
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"))
    cfg = hf.config.to_dict()
    cfg["quantization_config"] = FineGrainedFP8Config(weight_block_size=(128, 128)).to_dict()
    assert cfg["quantization_config"]["quant_method"] == "fp8"
    (out / "config.json").write_text(json.dumps(cfg))
    return out, hf, deq, tensors


@pytest.mark.parametrize("method", [None, "fp8"])
def test_fp8_checkpoint_loads_as_stored_with_the_logits_of_its_dequantized_weights(fp8_checkpoint, method):
    path, hf, deq, tensors = fp8_checkpoint
    model, _ = load_quantized(path, method, torch.float32, with_tokenizer=False)
    assert model.quantization == "fp8"
    layers = {n: m for n, m in model.named_modules() if n.rpartition(".")[2] in ALL_PROJECTIONS}
    assert len(layers) == 14 and all(isinstance(m, LinearFP8) and m.block_size == (128, 128) for m in layers.values())
    q = layers["model.layers.1.mlp.down_proj"]
    stored = tensors["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(q.weight.view(torch.uint8), stored.view(torch.uint8))  # no re-quantization
    assert torch.equal(q.weight_scale_inv, tensors["model.layers.1.mlp.down_proj.weight_scale_inv"])
    assert model.model.layers[0].self_attn.q_proj.bias is not None  # biases travel with their weights
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = deq(input_ids=ids).logits  # transformers on the dequantized weights
        fp8 = model(ids).logits  # FP8 matmuls: activations quantized per row too
        rel = ((fp8 - exact).norm() / exact.norm()).item()
        assert rel < 0.06, f"FP8 activations add {rel:.4f} relative logits error"  # measured 0.040
        torch.testing.assert_close(dequantize_model(model)(ids).logits, exact, rtol=1e-5, atol=1e-5)
    assert ((exact - hf(input_ids=ids).logits).norm() / exact.norm()).item() < 0.1  # the checkpoint is the model


def test_fp8_checkpoint_refuses_another_quantization(fp8_checkpoint):
    path = fp8_checkpoint[0]
    with pytest.raises(QuantizationError, match="stored in FP8.*load_in_fp8"):
        load_quantized(path, "nf4", torch.float32, with_tokenizer=False)


def test_static_activation_checkpoints_are_refused(fp8_checkpoint):
    path = fp8_checkpoint[0]
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["activation_scheme"] = "static"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantizationError, match="activation_scheme 'static'"):
        load_quantized(path, "fp8", torch.float32, with_tokenizer=False)


def test_bf16_checkpoint_is_quantized_per_channel_while_loading(fp8_checkpoint, tmp_path):
    _, hf, _, _ = fp8_checkpoint
    hf.save_pretrained(tmp_path / "bf16")
    model, _ = load_quantized(tmp_path / "bf16", "fp8", torch.float32, with_tokenizer=False)
    q = model.model.layers[0].mlp.up_proj
    assert isinstance(q, LinearFP8) and q.block_size == (1, 192) and q.weight_scale_inv.shape == (320, 1)
    assert model.quantization == "fp8" and q.bias is None
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        assert ((model(ids).logits - ref).norm() / ref.norm()).item() < 0.1


def test_fast_language_model_loads_in_fp8(tiny_model_dir):
    from velotune.compat.fast_model import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir), load_in_fp8=True)
    assert any(isinstance(m, LinearFP8) for m in model.modules())
    with pytest.raises(ConfigError, match="load_in_4bit and load_in_fp8"):
        FastLanguageModel.from_pretrained(str(tiny_model_dir), load_in_fp8=True, load_in_4bit=True)
    with pytest.raises(ConfigError, match="load_in_fp8"):
        FastLanguageModel.from_pretrained(str(tiny_model_dir), load_in_fp8=True, full_finetuning=True)
