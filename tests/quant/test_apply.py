"""quantize_model / dequantize_model on small module trees shaped like a decoder."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from velotune.errors import QuantizationError
from velotune.quant.apply import dequantize_model, quantize_model
from velotune.quant.int8 import Linear8bit
from velotune.quant.nf4 import Linear4bit


class Block(nn.Module):
    def __init__(self, h: int = 64, i: int = 96):
        super().__init__()
        self.q_proj = nn.Linear(h, h, bias=True)
        self.norm = nn.LayerNorm(h)
        self.mlp = nn.Sequential(nn.Linear(h, i, bias=False), nn.SiLU(), nn.Linear(i, h, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.q_proj(self.norm(x))
        return x + self.mlp(x)


class TinyLM(nn.Module):
    def __init__(self, tie: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.embed_tokens = nn.Embedding(50, 64)
        self.layers = nn.ModuleList([Block(), Block()])
        self.lm_head = nn.Linear(64, 50, bias=False)
        if tie:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


LINEARS = ["layers.0.q_proj", "layers.0.mlp.0", "layers.0.mlp.2", "layers.1.q_proj", "layers.1.mlp.0", "layers.1.mlp.2"]


@pytest.mark.parametrize(("method", "cls", "tol"), [("nf4", Linear4bit, 0.15), ("int8", Linear8bit, 0.01)])
def test_quantize_model_replaces_linears_but_not_lm_head_embeddings_or_norms(method, cls, tol):
    model = TinyLM()
    ids = torch.randint(0, 50, (2, 7))
    ref = model(ids)
    assert quantize_model(model, method, compute_dtype=torch.float32) is model
    kinds = {name: type(m) for name, m in model.named_modules()}
    assert all(kinds[name] is cls for name in LINEARS)
    assert kinds["lm_head"] is nn.Linear and kinds["embed_tokens"] is nn.Embedding
    assert kinds["layers.0.norm"] is nn.LayerNorm
    out = model(ids)
    assert ((out - ref).norm() / ref.norm()).item() < tol  # measured: nf4 0.070, int8 0.003
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("layers.") and "norm" not in n)


def test_quantized_model_trains_through_frozen_layers():
    model = quantize_model(TinyLM(), "nf4", compute_dtype=torch.float32)
    model(torch.randint(0, 50, (2, 5))).sum().backward()
    assert model.embed_tokens.weight.grad is not None and model.layers[0].norm.weight.grad is not None


def test_quantize_model_only_targets_and_skips_patterns():
    model = quantize_model(TinyLM(), "nf4", targets={"q_proj", "mlp.2"}, skip={"layers.1.q_proj"})
    kinds = {name: type(m) for name, m in model.named_modules()}
    assert kinds["layers.0.q_proj"] is Linear4bit and kinds["layers.1.q_proj"] is nn.Linear
    assert kinds["layers.0.mlp.2"] is Linear4bit and kinds["layers.0.mlp.0"] is nn.Linear


def test_quantizing_a_non_linear_layer_is_an_error_naming_it():
    with pytest.raises(
        QuantizationError,
        match=r"layer 'embed_tokens' is a torch\..*Embedding; velotune quantizes "
        r"torch.nn.Linear layers only",
    ):
        quantize_model(TinyLM(), "nf4", targets={"embed_tokens", "q_proj"})


def test_linear_subclass_is_refused_with_skip_hint():
    model = nn.Module()
    model.attn = nn.MultiheadAttention(64, 4)  # its out_proj is a Linear subclass read through .weight
    with pytest.raises(QuantizationError, match=r"layer 'attn.out_proj' .* Add 'attn.out_proj' to skip"):
        quantize_model(model, "nf4")
    quantize_model(model, "nf4", skip={"out_proj"})  # nothing else to do


def test_tied_lm_head_is_refused_unless_skipped():
    with pytest.raises(QuantizationError, match=r"'lm_head' shares its weight with \['embed_tokens.weight'\]"):
        quantize_model(TinyLM(tie=True), "nf4", skip=set())
    quantize_model(TinyLM(tie=True), "nf4")  # skipped by default


def test_unknown_method_and_unmatched_target_are_errors():
    with pytest.raises(
        QuantizationError, match=r"unknown quantization method 'fp4'; use one of \['fp8', 'int8', 'nf4'\]"
    ):
        quantize_model(TinyLM(), "fp4")
    with pytest.raises(QuantizationError, match=r"targets \['qproj'\] match no module"):
        quantize_model(TinyLM(), "nf4", targets={"qproj"})


def test_quantizing_twice_leaves_quantized_layers_alone_and_targeting_them_is_an_error():
    model = quantize_model(TinyLM(), "nf4")
    layer = model.layers[0].q_proj
    quantize_model(model, "int8")
    assert model.layers[0].q_proj is layer and type(model.lm_head) is nn.Linear
    with pytest.raises(QuantizationError, match="'layers.0.q_proj' is already quantized"):
        quantize_model(model, "nf4", targets={"q_proj"})


def test_progress_bar_counts_layers_and_can_be_turned_off(capsys):
    quantize_model(TinyLM(), "int8", progress=False)
    assert capsys.readouterr().err == ""
    quantize_model(TinyLM(), "int8")
    err = capsys.readouterr().err
    assert "quantize int8" in err and "6/6" in err


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_dequantize_model_restores_linears_computing_the_same(method):
    model = quantize_model(TinyLM(), method, compute_dtype=torch.float32)
    ids = torch.randint(0, 50, (2, 7))
    expected = model(ids)
    dequantize_model(model)
    assert all(type(model.get_submodule(name)) is nn.Linear for name in LINEARS)
    assert model.layers[0].q_proj.bias is not None and model.layers[0].mlp[0].bias is None
    torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-5)
    assert model.layers[0].q_proj.weight.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quantize_model_onto_gpu_layer_by_layer():
    model = TinyLM()
    quantize_model(model, "nf4", device="cuda")
    assert model.layers[0].q_proj.weight.is_cuda and not model.embed_tokens.weight.is_cuda
    model.to("cuda")
    assert model(torch.randint(0, 50, (2, 7), device="cuda")).is_cuda
