"""Reading and writing bitsandbytes 4-bit checkpoints: fixtures written from the format's spec (conftest.py), and
bitsandbytes' own modules where it is installed."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from velotune.errors import ModelLoadError
from velotune.quant.bnb_load import (
    bnb_4bit_layers,
    bnb_state_dict,
    from_bnb_state_dict,
    load_bnb_4bit_layers,
    nf4_from_bnb,
)
from velotune.quant.nf4 import Linear4bit


def _layer(in_features=96, out_features=40, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(40, 96), (17, 33)])
def test_spec_written_checkpoint_loads_with_same_outputs_as_our_quantization(nf4_spec, shape, double_quant):
    linear = _layer(shape[1], shape[0])
    tensors = nf4_spec.bnb_tensors(nf4_spec.quantize(linear.weight, 64, double_quant), "layer.", linear.bias)
    loaded = from_bnb_state_dict(tensors, "layer.", compute_dtype=torch.float32)
    ours = Linear4bit.from_linear(linear, compute_dtype=torch.float32, double_quant=double_quant)
    x = torch.randn(3, shape[1])
    assert torch.equal(loaded.dequantize(), ours.dequantize())
    assert torch.equal(loaded(x), ours(x))
    assert loaded.nf4.dtype == torch.float32 and loaded.nf4.double_quant == double_quant


def test_written_state_dict_equals_the_spec_bytes(nf4_spec):
    linear = _layer()
    expected = nf4_spec.bnb_tensors(nf4_spec.quantize(linear.weight), "model.q_proj.", linear.bias)
    written = bnb_state_dict(Linear4bit.from_linear(linear, compute_dtype=torch.float32), "model.q_proj.")
    assert written.keys() == expected.keys()
    for key in expected:
        assert written[key].dtype == expected[key].dtype, key
        assert torch.equal(written[key], expected[key]), key


def test_safetensors_round_trip_of_several_layers(tmp_path):
    layers = {f"model.layers.{i}.mlp.up_proj": Linear4bit.from_linear(_layer(seed=i), torch.float32) for i in range(3)}
    tensors = {}
    for name, layer in layers.items():
        tensors |= bnb_state_dict(layer, name + ".")
    tensors["model.embed_tokens.weight"] = torch.randn(10, 96)
    save_file(tensors, tmp_path / "model.safetensors")  # refuses tensors sharing storage, so this checks none do
    loaded = load_file(tmp_path / "model.safetensors")
    assert bnb_4bit_layers(loaded) == {name: "nf4" for name in layers}
    x = torch.randn(2, 96)
    for name, layer in layers.items():
        assert torch.equal(from_bnb_state_dict(loaded, name + ".", torch.float32)(x), layer(x))


def test_quant_storage_other_than_uint8_reads_as_bytes(nf4_spec):
    linear = _layer(in_features=128, out_features=8)
    tensors = nf4_spec.bnb_tensors(nf4_spec.quantize(linear.weight), "", linear.bias)
    tensors["weight"] = tensors["weight"].reshape(-1).view(torch.bfloat16).unsqueeze(1)  # bnb quant_storage=bf16
    assert torch.equal(nf4_from_bnb(tensors).dequantize(), Linear4bit.from_linear(linear, torch.float32).dequantize())


def test_detects_bnb_4bit_layers_among_other_keys():
    keys = [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.q_proj.weight.absmax",
        "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4",
        "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__fp4",
        "model.norm.weight",
        "lm_head.weight",
    ]
    assert bnb_4bit_layers(keys) == {"model.layers.0.self_attn.q_proj": "nf4", "model.layers.0.mlp.up_proj": "fp4"}
    assert bnb_4bit_layers(["lm_head.weight"]) == {}


def test_fp4_checkpoint_is_refused_naming_layer_and_fix(nf4_spec):
    tensors = nf4_spec.bnb_tensors(nf4_spec.quantize(_layer().weight), "model.q_proj.")
    key = "model.q_proj.weight.quant_state.bitsandbytes__"
    tensors[key + "fp4"] = tensors.pop(key + "nf4")
    with pytest.raises(ModelLoadError, match=r"model\.q_proj: bitsandbytes 4-bit layer of type fp4; velotune"):
        from_bnb_state_dict(tensors, "model.q_proj.")


def test_missing_and_malformed_tensors_are_named(nf4_spec):
    good = nf4_spec.bnb_tensors(nf4_spec.quantize(_layer().weight), "q.")
    missing = dict(good)
    del missing["q.weight.nested_absmax"]
    with pytest.raises(ModelLoadError, match=r"q: missing keys \['q\.weight\.nested_absmax'\]"):
        nf4_from_bnb(missing, "q.")
    short = dict(good, **{"q.weight": good["q.weight"][:-1]})
    with pytest.raises(ModelLoadError, match=r"1919 packed bytes, expected 1920 for \[40, 96\]"):
        nf4_from_bnb(short, "q.")
    remapped = dict(good, **{"q.weight.quant_map": torch.linspace(-1, 1, 16)})
    with pytest.raises(ModelLoadError, match="quant_map that differs from the NF4 table"):
        nf4_from_bnb(remapped, "q.")
    corrupt = dict(good, **{"q.weight.quant_state.bitsandbytes__nf4": torch.tensor([123, 34, 113], dtype=torch.uint8)})
    with pytest.raises(ModelLoadError, match="not bitsandbytes' packed json quant state"):
        nf4_from_bnb(corrupt, "q.")
    state = json.loads(bytes(good["q.weight.quant_state.bitsandbytes__nf4"].tolist()))
    state["shape"] = [40, 96, 1]
    three_d = dict(good, **{"q.weight.quant_state.bitsandbytes__nf4": torch.tensor(list(json.dumps(state).encode()))})
    with pytest.raises(ModelLoadError, match=r"shape \[40, 96, 1\], expected a 2-D \[out, in\] linear weight"):
        nf4_from_bnb(three_d, "q.")
    with pytest.raises(ModelLoadError, match="not a bitsandbytes 4-bit layer"):
        nf4_from_bnb({"q.weight": torch.randn(4, 4)}, "q.")


class _Tiny(nn.Module):
    def __init__(self, bias: bool = False):
        super().__init__()
        self.embed = nn.Embedding(10, 96)
        self.proj = nn.Linear(96, 40, bias=bias)
        self.head = nn.Linear(40, 10, bias=False)


def test_load_bnb_4bit_layers_replaces_only_the_quantized_linears():
    source = _layer(bias=False)
    tensors = bnb_state_dict(Linear4bit.from_linear(source, torch.float32), "proj.")
    model = _Tiny()
    assert load_bnb_4bit_layers(model, tensors, torch.float32) == ["proj"]
    assert isinstance(model.proj, Linear4bit) and isinstance(model.head, nn.Linear)
    x = torch.randn(2, 96)
    assert torch.equal(model.proj(x), Linear4bit.from_linear(source, torch.float32)(x))


def test_load_bnb_4bit_layers_reports_mismatched_model():
    tensors = bnb_state_dict(Linear4bit.from_linear(_layer(in_features=64, bias=False), torch.float32), "proj.")
    with pytest.raises(ModelLoadError, match=r"proj: checkpoint weight is \[40, 64\], the model expects \[40, 96\]"):
        load_bnb_4bit_layers(_Tiny(), tensors)
    tensors = bnb_state_dict(Linear4bit.from_linear(_layer(bias=False), torch.float32), "missing.")
    with pytest.raises(ModelLoadError, match="4-bit layer 'missing' but the model has no such module"):
        load_bnb_4bit_layers(_Tiny(), tensors)
    tensors = bnb_state_dict(Linear4bit.from_linear(_layer(bias=False), torch.float32), "proj.")
    with pytest.raises(ModelLoadError, match="proj: checkpoint has no bias but the model's layer has bias"):
        load_bnb_4bit_layers(_Tiny(bias=True), tensors)


# bitsandbytes 0.50.2's native CPU dequantize_4bit is wrong when in_features % 64 == 32 (e.g. [40, 96]; its torch
# backend agrees with us there), so the layers compared with it below are 128 wide.


def test_bitsandbytes_linear4bit_checkpoint_loads_with_identical_outputs():
    bnb = pytest.importorskip("bitsandbytes", reason="pip install '.[test]' brings bitsandbytes")
    linear = _layer(in_features=128)
    theirs = bnb.nn.Linear4bit(128, 40, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    theirs.load_state_dict(linear.state_dict())
    theirs = theirs.to("cpu")  # bitsandbytes quantizes when the module is moved
    loaded = from_bnb_state_dict(theirs.state_dict(), compute_dtype=torch.float32)
    x = torch.randn(3, 128)
    torch.testing.assert_close(loaded(x), theirs(x), rtol=1e-5, atol=1e-5)
    weight = bnb.functional.dequantize_4bit(theirs.weight, theirs.weight.quant_state)
    assert torch.equal(loaded.dequantize(), weight)


def test_our_checkpoint_loads_in_bitsandbytes():
    bF = pytest.importorskip("bitsandbytes.functional", reason="pip install '.[test]' brings bitsandbytes")
    ours = Linear4bit.from_linear(_layer(in_features=128), compute_dtype=torch.float32)
    tensors = bnb_state_dict(ours, "layer.")
    state = bF.QuantState.from_dict(
        {k.removeprefix("layer.weight."): v for k, v in tensors.items() if k.startswith("layer.weight.")}, "cpu"
    )
    assert torch.equal(bF.dequantize_4bit(tensors["layer.weight"], state), ours.dequantize())
    # the same json bytes bitsandbytes writes for the same weights
    weight = _layer(in_features=128).weight.detach()
    _, theirs = bF.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    their_json = theirs.as_dict(packed=True)["quant_state.bitsandbytes__nf4"]
    assert torch.equal(tensors["layer.weight.quant_state.bitsandbytes__nf4"], their_json)
