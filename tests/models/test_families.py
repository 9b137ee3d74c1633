"""Every family against transformers on tiny random models built with transformers' own config classes (fp32):
logits, loss, LoRA gradients against PEFT, a config.json + fused-weight round trip back into transformers, and a
short training run. Norm weights and biases are randomised (transformers initialises them to 1/0, which would hide
an offset or bias bug); windows are shorter than the sequence and soft-caps bend the logits.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from peft import get_peft_model as peft_get_peft_model

from tests.helpers import velotune_from_hf
from velotune.lora.apply import ALL_PROJECTIONS, get_peft_model, lora_layers
from velotune.models.families import family_for
from velotune.models.load import build_empty, load_weights

VOCAB, T = 128, 24
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    attn_implementation="eager",  # transformers' reference path for windows and soft-caps
)


def _qwen2(**kw):
    from transformers import Qwen2Config

    return Qwen2Config(**SMALL, tie_word_embeddings=True, rope_theta=1_000_000.0, **kw)


def _qwen3(**kw):
    from transformers import Qwen3Config

    return Qwen3Config(**SMALL, head_dim=32, **kw)  # q_proj 4 x 32 = 128 wide on a 64-wide model


def _mistral(**kw):
    from transformers import MistralConfig

    return MistralConfig(**SMALL, sliding_window=8, **kw)


def _gemma2(**kw):
    from transformers import Gemma2Config

    return Gemma2Config(
        **SMALL,
        head_dim=16,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=0.5,
        final_logit_softcapping=1.5,
        sliding_window=8,
        pad_token_id=0,
        **kw,
    )


def _gemma3(**kw):
    from transformers import Gemma3TextConfig

    small = {**SMALL, "num_hidden_layers": 3}
    rope = {
        "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    }
    return Gemma3TextConfig(
        **small,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters=rope,
        pad_token_id=0,
        **kw,
    )


def _phi3(**kw):
    from transformers import Phi3Config

    return Phi3Config(**SMALL, pad_token_id=0, eos_token_id=1, **kw)


def _granite(**kw):
    from transformers import GraniteConfig

    multipliers = dict(embedding_multiplier=2.0, attention_multiplier=0.25, residual_multiplier=0.8, logits_scaling=1.5)
    return GraniteConfig(**SMALL, tie_word_embeddings=True, **multipliers, **kw)


def _phi3_longrope(**kw):
    """Phi-4-mini style: partial rotary and longrope; original context 16 < T so the long factors are in use."""
    rot_half = 64 // 4 // 2 // 2  # head_dim 16, partial 0.5 -> 8 rotary channels -> 4 factors
    scaling = {
        "rope_type": "longrope",
        "short_factor": [1.0, 1.3, 1.7, 2.0][:rot_half],
        "long_factor": [1.5, 3.0, 5.0, 9.0][:rot_half],
    }
    return _phi3(partial_rotary_factor=0.5, rope_scaling=scaling, original_max_position_embeddings=16, **kw)


def _llama(rope_scaling, **kw):
    from tests.conftest import tiny_llama_config

    return tiny_llama_config(rope_scaling=rope_scaling, rope_theta=10000.0, attn_implementation="eager", **kw)


CASES = {
    "qwen2": _qwen2,
    "qwen2-sliding": lambda: _qwen2(use_sliding_window=True, sliding_window=8, max_window_layers=1),
    "qwen3": _qwen3,
    "mistral": _mistral,
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "phi3": _phi3,
    "granite": _granite,
    "phi3-longrope-partial": _phi3_longrope,
    "phi3-sliding": lambda: _phi3(sliding_window=8),
    "llama-linear-rope": lambda: _llama({"rope_type": "linear", "factor": 4.0}),
    "llama-yarn-rope": lambda: _llama({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
}
FAMILY_CASES = ["qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "granite"]


def hf_model(case: str):
    """A transformers model of `case` with every parameter (norms and biases too) randomised, eval mode."""
    return randomized_hf_model(CASES[case]())


def randomized_hf_model(config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "norm" in name or name.endswith("bias") else 0.02))
    return model


def _batch(t: int = T, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (2, t), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, :5] = -100
    return ids, labels


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_loss_equal_transformers(case):
    hf = hf_model(case)
    ours = velotune_from_hf(hf)
    ids, labels = _batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, labels=labels)
        out = ours(ids, labels=labels, return_logits=True)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["mistral", "gemma2", "gemma3", "qwen2-sliding", "phi3-longrope-partial"])
def test_padded_batch_equals_transformers(case):
    """Right padding with windows, soft-caps and longrope: real tokens get transformers' logits."""
    hf = hf_model(case)
    ours = velotune_from_hf(hf)
    ids, _ = _batch()
    mask = torch.ones_like(ids)
    mask[1, 19:] = 0
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        out = ours(ids, attention_mask=mask).logits
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1, :19], ref[1, :19], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["mistral", "gemma2", "gemma3"])
def test_kv_cache_generation_matches_full_forward_past_the_window(case):
    from velotune.models.decoder import KVCache

    ours = velotune_from_hf(hf_model(case))
    ids, _ = _batch()
    cache = KVCache(ours.config.num_layers)
    with torch.no_grad():
        full = ours(ids).logits
        first = ours(ids[:, :6], cache=cache).logits
        steps = [ours(ids[:, i : i + 1], cache=cache).logits for i in range(6, T)]
    torch.testing.assert_close(first, full[:, :6], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 6:], rtol=1e-5, atol=1e-5)


def _peft_names(case: str) -> tuple[list[str], dict[str, int], dict[str, int]]:
    """PEFT targets, rank and alpha patterns. Phi-3 is fused in transformers: one LoRA of rank 3r on qkv_proj with
    A = [A_q; A_k; A_v] and block-diagonal B equals our three rank-r LoRAs (alpha scaled to keep alpha / r)."""
    if not case.startswith("phi3"):
        return list(ALL_PROJECTIONS), {}, {}
    return (
        ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
        {"qkv_proj": 12, "gate_up_proj": 8},
        {"qkv_proj": 24, "gate_up_proj": 16},
    )


_FUSED_LORA = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2)}
_FUSED_LORA |= {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


def _peft_slot(case: str, name: str, layer) -> tuple[str, slice, slice]:
    """Where our LoRA `name` sits in PEFT's: (module name, rows of A, (rows, cols) block of B)."""
    parent, _, leaf = name.rpartition(".")
    if not case.startswith("phi3") or leaf not in _FUSED_LORA:
        return name, slice(None), (slice(None), slice(None))
    fused, i = _FUSED_LORA[leaf]
    r = layer.lora_A.shape[0]
    sizes = {"qkv_proj": [64, 32, 32], "gate_up_proj": [96, 96]}[fused]
    start = sum(sizes[:i])
    return f"{parent}.{fused}", slice(i * r, (i + 1) * r), (slice(start, start + sizes[i]), slice(i * r, (i + 1) * r))


@pytest.mark.parametrize("case", FAMILY_CASES + ["phi3-longrope-partial"])
def test_lora_loss_and_gradients_equal_peft(case):
    hf = hf_model(case)
    ours = velotune_from_hf(hf)
    targets, ranks, alphas = _peft_names(case)
    peft_model = peft_get_peft_model(
        hf,
        LoraConfig(
            r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, rank_pattern=ranks, alpha_pattern=alphas
        ),
    )
    get_peft_model(ours, r=4, lora_alpha=8)
    peft_params = dict(peft_model.named_parameters())
    for name, p in peft_params.items():
        if "lora_" in name:
            p.data.zero_()  # off-diagonal blocks of a fused B stay 0
    torch.manual_seed(5)
    slots = {}
    for name, layer in lora_layers(ours).items():
        module, rows_a, block_b = _peft_slot(case, name, layer)
        slots[name] = (module, rows_a, block_b)
        a, b = torch.randn_like(layer.lora_A) * 0.1, torch.randn_like(layer.lora_B) * 0.1
        layer.lora_A.data.copy_(a)
        layer.lora_B.data.copy_(b)
        peft_params[f"base_model.model.{module}.lora_A.default.weight"].data[rows_a] = a
        peft_params[f"base_model.model.{module}.lora_B.default.weight"].data[block_b] = b
    ids, labels = _batch(t=20, seed=0)
    ref = peft_model(input_ids=ids, labels=labels).loss
    ref.backward()
    out = ours(ids, labels=labels).loss
    assert _uses_fused_lora_mlp(out)  # LoRA on gate, up and down: the MLP is one Function
    out.backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for name, layer in lora_layers(ours).items():
        module, rows_a, block_b = slots[name]
        grad_a = peft_params[f"base_model.model.{module}.lora_A.default.weight"].grad[rows_a]
        grad_b = peft_params[f"base_model.model.{module}.lora_B.default.weight"].grad[block_b]
        torch.testing.assert_close(layer.lora_A.grad, grad_a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.lora_B.grad, grad_b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", FAMILY_CASES + ["phi3-longrope-partial"])
def test_config_and_weights_round_trip_into_transformers(case):
    """to_hf (without the checkpoint's own config.json) and fuse_weights make a model transformers loads as is."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = hf_model(case)
    ours = velotune_from_hf(hf)
    spec = family_for(ours.config.model_type)
    cfg = ours.config
    cfg.extra.pop("hf_config")
    config = AutoConfig.for_model(**spec.to_hf(cfg), attn_implementation="eager")
    again = AutoModelForCausalLM.from_config(config).float().eval()
    state = {k: v for k, v in spec.fuse(cfg, ours.state_dict()).items()}
    again.load_state_dict(state, strict=True)
    assert spec.from_hf(again.config.to_dict()).to_dict() | {"extra": {}} == cfg.to_dict() | {"extra": {}}
    ids, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, hf(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_short_lora_training_lowers_loss(case):
    ours = velotune_from_hf(hf_model(case))
    get_peft_model(ours, r=8, lora_alpha=16)
    ours.train()
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    ids, labels = _batch(t=16, seed=3)
    losses = []
    for _ in range(6):
        loss = ours(ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] * 0.9, losses


def test_phi3_split_then_fuse_is_identity():
    hf = hf_model("phi3")
    ours = velotune_from_hf(hf)
    spec = family_for("phi3")
    fused = spec.fuse(ours.config, ours.state_dict())
    assert set(fused) == set(hf.state_dict())
    for name, tensor in hf.state_dict().items():
        torch.testing.assert_close(fused[name], tensor, rtol=0, atol=0)
    assert "model.layers.0.self_attn.q_proj.weight" in dict(ours.named_parameters())  # LoRA targets stay split


def test_phi3_checkpoint_with_wrong_fused_shape_names_the_tensor():
    from velotune.errors import ModelLoadError

    hf = hf_model("phi3")
    cfg = family_for("phi3").from_hf(hf.config.to_dict())
    state = dict(hf.state_dict())
    state["model.layers.1.mlp.gate_up_proj.weight"] = state["model.layers.1.mlp.gate_up_proj.weight"][:-2]
    with pytest.raises(ModelLoadError, match="model.layers.1.mlp"):
        load_weights(build_empty(cfg), state.items(), "phi3", torch.float32)


@pytest.mark.parametrize("case", ["gemma2", "gemma3"])
def test_gemma_runs_in_bfloat16_like_transformers(case):
    """bf16 end to end (embedding scale rounded to bf16 as transformers does, norms in fp32): close to theirs."""
    hf = hf_model(case).to(torch.bfloat16)
    ours = velotune_from_hf(hf, dtype=torch.bfloat16)
    ids, _ = _batch()
    with torch.no_grad():
        ref, out = hf(input_ids=ids).logits.float(), ours(ids).logits
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


def test_gemma_refuses_float16_and_names_bfloat16():
    from velotune.errors import ConfigError
    from velotune.models.families import check_dtype

    for case in ("gemma2", "gemma3"):
        cfg = family_for(CASES[case]().model_type).from_hf(CASES[case]().to_dict())
        with pytest.raises(ConfigError, match="float16.*bfloat16"):
            check_dtype(cfg, torch.float16)
        check_dtype(cfg, torch.bfloat16)
    check_dtype(family_for("qwen2").from_hf(_qwen2().to_dict()), torch.float16)


def test_unknown_model_type_lists_every_supported_one():
    from velotune.errors import UnsupportedArchitectureError

    with pytest.raises(UnsupportedArchitectureError, match="'gpt2'") as err:
        family_for("gpt2")
    for name in ("gemma2", "gemma3_text", "llama", "mistral", "phi3", "qwen2", "qwen3"):
        assert name in str(err.value)


def test_default_templates_are_builtin_names():
    from velotune.data.templates import BUILTIN_TEMPLATES
    from velotune.models.families import FAMILIES

    for spec in FAMILIES.values():
        assert spec.default_template is None or spec.default_template in BUILTIN_TEMPLATES, spec.name


def test_qwen2_config_json_with_sliding_window_switched_off_has_no_window():
    """Qwen2.5 / R1-Distill-Qwen config.json: sliding_window set, use_sliding_window false -> full attention."""
    raw = {**_qwen2().to_dict(), "sliding_window": 4, "use_sliding_window": False, "max_window_layers": 1}
    raw.pop("layer_types")
    cfg = family_for("qwen2").from_hf(raw)
    assert cfg.sliding_window is None and not any(cfg.is_sliding(i) for i in range(cfg.num_layers))
    assert (cfg.attention_bias, cfg.o_bias, cfg.tie_word_embeddings, cfg.rope_theta) == (True, False, True, 1e6)
    on = family_for("qwen2").from_hf({**raw, "use_sliding_window": True})
    assert [on.is_sliding(i) for i in range(on.num_layers)] == [False, True]  # from max_window_layers up


def test_gemma3_transformers4_config_json_reads_like_transformers5():
    """rope_theta / rope_local_base_freq / rope_scaling / sliding_window_pattern (v4) = nested rope_parameters (v5)."""
    from transformers import Gemma3TextConfig

    raw = {
        **{k: v for k, v in SMALL.items() if k != "attn_implementation"},
        "model_type": "gemma3_text",
        "num_hidden_layers": 7,
        "head_dim": 16,
        "rope_theta": 500_000.0,
        "rope_local_base_freq": 20_000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "sliding_window_pattern": 3,
        "sliding_window": 16,
    }
    ours = family_for("gemma3_text").from_hf(raw)
    theirs = family_for("gemma3_text").from_hf(Gemma3TextConfig(**raw).to_dict())
    for field in (
        "rope_theta",
        "rope_scaling",
        "rope_local_theta",
        "rope_local_scaling",
        "layer_types",
        "sliding_window",
    ):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert ours.rope_local_scaling is None and ours.layer_types[2] == ours.layer_types[5] == "full_attention"


def test_phi3_su_rope_scaling_is_longrope_with_the_top_level_original_context():
    raw = {
        **_phi3().to_dict(),
        "rope_scaling": {"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8},
        "original_max_position_embeddings": 4096,
        "max_position_embeddings": 131072,
    }
    raw.pop("rope_parameters")
    cfg = family_for("phi3").from_hf(raw)
    assert cfg.rope_scaling["rope_type"] == "longrope"
    assert cfg.rope_scaling["original_max_position_embeddings"] == 4096


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"layer_types": ["full_attention", "chunked_attention"]}, "chunked_attention"),
        ({"layer_types": ["full_attention"]}, "1 entries for 2 layers"),
        ({"sliding_window": 0}, "sliding_window"),
        ({"partial_rotary_factor": 0.1}, "partial_rotary_factor"),
        ({"attn_logit_softcap": 0.0}, "attn_logit_softcap"),
        ({"activation": "relu"}, "relu"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "'dynamic'.*llama3.*longrope.*yarn"),
    ],
)
def test_invalid_knobs_are_config_errors(change, message):
    from velotune.errors import ConfigError
    from velotune.models.config import ModelConfig

    base = dict(model_type="llama", vocab_size=8, hidden_size=16, intermediate_size=8, num_layers=2, num_heads=2)
    with pytest.raises(ConfigError, match=message):
        build_empty(ModelConfig(**base, num_kv_heads=1, **change))


def _uses_fused_lora_mlp(loss: torch.Tensor) -> bool:
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "LoRAMLPFunctionBackward":
            return True
        stack.extend(fn for fn, _ in node.next_functions)
    return False
