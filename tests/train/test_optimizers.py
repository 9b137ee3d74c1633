"""Optimizers by name: velotune's 8-bit AdamW follows torch's AdamW with a quarter of the state memory and resumes
exactly from its state dict; adafactor and sgd build; unknown names list the valid ones."""

import copy

import pytest
import torch

from velotune.errors import ConfigError
from velotune.train.adamw_8bit import (
    BLOCK,
    AdamW8bit,
    dequantize_signed,
    dequantize_unsigned,
    quantize_signed,
    quantize_unsigned,
)
from velotune.train.config import TrainConfig
from velotune.train.optim import build_optimizer


def _problem(seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter((torch.randn(96, 80, generator=g) * 0.1).to(dtype))  # 7680 values: 8-bit states
    b = torch.nn.Parameter(torch.zeros(96, dtype=dtype))  # small: fp32 states
    x, y = torch.randn(64, 80, generator=g), torch.randn(64, 96, generator=g)
    return [w, b], x, y


def _loss(params, x, y):
    w, b = params
    return ((x @ w.float().t() + b.float() - y) ** 2).mean()


def _value(params, x, y) -> float:
    with torch.no_grad():
        return float(_loss(params, x, y))


def _run(opt, params, x, y, steps):
    for _ in range(steps):
        opt.zero_grad()
        _loss(params, x, y).backward()
        opt.step()
    return _value(params, x, y)


def test_8bit_adamw_follows_torch_adamw():
    p8, x, y = _problem()
    p32 = [torch.nn.Parameter(p.detach().clone()) for p in p8]
    start = _value(p8, x, y)
    l8 = _run(AdamW8bit(p8, lr=1e-2, weight_decay=0.01), p8, x, y, 40)
    l32 = _run(torch.optim.AdamW(p32, lr=1e-2, weight_decay=0.01), p32, x, y, 40)
    assert l8 < 0.5 * start
    assert abs(l8 - l32) < 0.03 * l32
    drift = (p8[0] - p32[0]).norm() / (p32[0] - _problem()[0][0]).norm()
    assert drift < 0.05  # weights moved along the same path


def test_8bit_state_is_a_quarter_of_adamw():
    params, x, y = _problem()
    opt = AdamW8bit(params, lr=1e-3)
    _run(opt, params, x, y, 1)
    state = opt.state[params[0]]
    nbytes = sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    assert state["m_codes"].dtype == torch.int8 and state["v_codes"].dtype == torch.uint8
    assert nbytes < 0.27 * 2 * 4 * params[0].numel()
    assert opt.state[params[1]]["exp_avg"].dtype == torch.float32  # small parameters keep fp32 states


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_8bit_adamw_resumes_exactly_from_its_state_dict(dtype):
    params, x, y = _problem(dtype=dtype)
    opt = AdamW8bit(params, lr=1e-2)
    _run(opt, params, x, y, 3)
    saved_params, saved_state = [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())
    expected = _run(opt, params, x, y, 3)

    again = [torch.nn.Parameter(p) for p in saved_params]
    opt2 = AdamW8bit(again, lr=1e-2)
    opt2.load_state_dict(saved_state)
    state = opt2.state[again[0]]
    assert state["m_codes"].dtype == torch.int8 and state["m_absmax"].dtype == torch.float32
    assert _run(opt2, again, x, y, 3) == expected


def test_blockwise_quantization_error_is_small_and_keeps_small_values():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3 * BLOCK + 17, generator=g) * torch.logspace(-4, 0, 3 * BLOCK + 17)
    codes, absmax = quantize_signed(x)
    back = dequantize_signed(codes, absmax, x)
    assert (back - x).abs().max() <= 0.01 * x.abs().max()
    v = x * x
    vc, va = quantize_unsigned(v)
    vb = dequantize_unsigned(vc, va, v)
    assert ((vb.sqrt() - v.sqrt()).abs() <= 0.01 * v.sqrt().max()).all()
    assert (vb[v > 1e-8 * v.max()] > 0).all()  # second moments far below the block's largest do not vanish


@pytest.mark.parametrize("name", ["adamw_torch", "adamw_torch_fused", "adamw_8bit", "adafactor", "sgd"])
def test_every_optimizer_name_builds_and_steps(name):
    params, x, y = _problem()
    opt = build_optimizer(params, TrainConfig(optim=name, learning_rate=1e-2))
    assert _run(opt, params, x, y, 2) < _value(_problem()[0], x, y)


def test_unknown_optimizer_and_scheduler_list_the_valid_ones():
    with pytest.raises(ConfigError, match="optim: 'adam8' is not valid; choose one of: adamw_torch, .*adamw_8bit"):
        TrainConfig(optim="adam8")
    with pytest.raises(ConfigError, match="lr_scheduler_type: 'cosin' is not valid; choose one of: cosine, linear"):
        TrainConfig(lr_scheduler_type="cosin")
