"""FastLanguageModel: loading, LoRA, modes, the transformers-facing model interface, and the unsupported-API errors."""

from __future__ import annotations

import copy

import pytest
import torch

from velotune.compat import FastLanguageModel, VelotuneForCausalLM
from velotune.errors import ConfigError
from velotune.lora.apply import ALL_PROJECTIONS, lora_layers
from velotune.quant.nf4 import Linear4bit


def test_from_pretrained_gives_a_model_trainer_accepts(loaded_4bit):
    model, tok = loaded_4bit
    assert isinstance(model, VelotuneForCausalLM)
    assert isinstance(model.model.model.layers[0].self_attn.q_proj, Linear4bit)
    cfg = model.config
    assert (cfg.model_type, cfg.vocab_size, cfg.hidden_size, cfg.use_cache) == ("llama", len(tok), 32, True)
    assert cfg.get_text_config() is cfg and model.generation_config.eos_token_id == tok.eos_token_id
    assert tok.model_max_length == 128 and model.max_seq_length == 128
    # the flags that make Trainer refuse a quantized model, or SFTTrainer cast LoRA weights to bf16, are absent
    for flag in ("is_quantized", "hf_quantizer", "quantization_method", "is_loaded_in_4bit", "_hf_peft_config_loaded"):
        assert not getattr(model, flag, False)
    from transformers.trainer_utils import validate_quantization_for_training

    validate_quantization_for_training(model)


def test_get_peft_model_puts_lora_on_the_seven_projections(loaded_4bit):
    model = copy.deepcopy(loaded_4bit[0])
    out = FastLanguageModel.get_peft_model(
        model,
        r=16,
        target_modules=list(ALL_PROJECTIONS),
        lora_alpha=16,
        lora_dropout=0,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=3407,
        use_rslora=False,
        loftq_config=None,
    )
    assert out is model and model.has_lora
    layers = lora_layers(model.model)
    assert len(layers) == 7 * 2 and {n.rsplit(".", 1)[1] for n in layers} == set(ALL_PROJECTIONS)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert model.model.gradient_checkpointing == "offload"  # "unsloth" is velotune's offload checkpointing
    again = FastLanguageModel.get_peft_model(copy.deepcopy(loaded_4bit[0]), r=16, random_state=3407)
    for (name, a), b in zip(lora_layers(model.model).items(), lora_layers(again.model).values(), strict=True):
        assert torch.equal(a.lora_A, b.lora_A), name  # random_state fixes the initialisation


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"loftq_config": {"loftq_bits": 4}}, "loftq_config"),
        ({"bias": "all"}, "bias"),
        ({"modules_to_save": ["lm_head", "embed_tokens"]}, "modules_to_save"),
        ({"layers_to_transform": [0]}, "layers_to_transform"),
        ({"init_lora_weights": "gaussian"}, "init_lora_weights"),
        ({"target_modules": ["q_proj", "lm_head"]}, "lm_head"),
        ({"use_gradient_checkpointing": "sometimes"}, "use_gradient_checkpointing"),
        ({"max_seq_length": 10**6}, "max_seq_length"),
        ({"lora_rank": 8}, "lora_rank"),
    ],
)
def test_unsupported_peft_arguments_raise_by_name(loaded_4bit, kwargs, named):
    with pytest.raises(ConfigError, match=named):
        FastLanguageModel.get_peft_model(copy.deepcopy(loaded_4bit[0]), r=8, **kwargs)


def test_use_dora_adds_trainable_magnitudes_on_the_4bit_base(loaded_4bit):
    """PEFT's use_dora: each projection trains A, B and a magnitude vector that starts at the base's row norms."""
    model = FastLanguageModel.get_peft_model(copy.deepcopy(loaded_4bit[0]), r=8, use_dora=True)
    trainable = {n.rsplit(".", 1)[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "lora_magnitude_vector"}
    layer = next(iter(lora_layers(model.model).values()))
    norms = layer.base_layer.dequantize(torch.float32).norm(dim=1)
    torch.testing.assert_close(layer.lora_magnitude_vector.float(), norms, rtol=1e-4, atol=1e-6)


def test_loftq_config_none_or_empty_is_plain_lora(loaded_4bit):
    for value in (None, {}):
        model = FastLanguageModel.get_peft_model(copy.deepcopy(loaded_4bit[0]), loftq_config=value)
        assert model.has_lora


def test_get_peft_model_twice_is_refused(lora_4bit):
    with pytest.raises(ConfigError, match="already has LoRA"):
        FastLanguageModel.get_peft_model(lora_4bit[0])


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"fast_inference": True}, "fast_inference"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"full_finetuning": True, "load_in_4bit": True}, "full_finetuning"),
        ({"max_seq_length": 10**6}, "max_seq_length"),
        ({"device_map": {"model.layers.0": 0, "lm_head": 1}}, "device_map"),
        ({"trust_remote_code": True}, "trust_remote_code"),
        ({"dtype": "float8"}, "dtype"),
        ({"load_in_bits": 3}, "load_in_bits"),
    ],
)
def test_unsupported_load_arguments_raise_by_name(tiny_model_dir, kwargs, named):
    with pytest.raises(ConfigError, match=named):
        FastLanguageModel.from_pretrained(str(tiny_model_dir), **kwargs)


def test_full_finetuning_trains_every_weight_in_16_bit(tiny_model_dir):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir), full_finetuning=True)
    assert not any(isinstance(m, Linear4bit) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ConfigError, match="full_finetuning"):
        FastLanguageModel.get_peft_model(model)


def test_saved_adapter_directory_loads_back(lora_4bit, tiny_model_dir, tmp_path):
    model, tok = lora_4bit
    model.save_pretrained(tmp_path / "lora_model")
    tok.save_pretrained(tmp_path / "lora_model")
    again, tok2 = FastLanguageModel.from_pretrained(str(tmp_path / "lora_model"), load_in_4bit=True)
    assert again.has_lora and len(tok2) == len(tok)
    ids = torch.tensor([[5, 60, 700, 42, 9]])
    model.eval()
    again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)


def test_for_inference_and_for_training_switch_modes(lora_4bit):
    model = lora_4bit[0]
    assert FastLanguageModel.for_inference(model) is model and not model.training
    assert all(not m.training for m in model.modules())
    FastLanguageModel.for_training(model)
    assert model.training and model.model.gradient_checkpointing == "offload"


def test_forward_returns_a_transformers_style_output(lora_4bit):
    model = lora_4bit[0]
    ids = torch.tensor([[5, 60, 700, 42, 9], [8, 7, 6, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False, return_dict=True)
    assert out.loss is out["loss"] is out[0] and out.logits is None  # training: loss fused with the LM head
    out.loss.backward()
    model.eval()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    assert out.logits.shape == (2, 5, model.config.vocab_size)  # eval: logits too, for compute_metrics
    total = model(input_ids=ids, attention_mask=mask, labels=ids, num_items_in_batch=1).loss
    torch.testing.assert_close(total / 8, out.loss)  # 8 target tokens: 4 in row 0 and 4 in row 1 (padding too)


def test_forward_rejects_inputs_it_cannot_honour(lora_4bit):
    model = lora_4bit[0]
    ids = torch.tensor([[5, 60, 700]])
    with pytest.raises(ConfigError, match="inputs_embeds"):
        model(input_ids=ids, inputs_embeds=torch.zeros(1, 3, 32))
    with pytest.raises(ConfigError, match="text_column"):
        model(input_ids=ids, text_column=["x"])


def test_state_dict_round_trips_without_the_tied_head_copy(lora_4bit):
    model = lora_4bit[0]
    sd = model.state_dict()
    assert "model.model.embed_tokens.weight" in sd and "model.lm_head.weight" not in sd
    other = copy.deepcopy(model)
    for layer in lora_layers(other.model).values():
        torch.nn.init.zeros_(layer.lora_B)
    result = other.load_state_dict(sd, strict=False)
    assert result.missing_keys == ["model.lm_head.weight"] and not result.unexpected_keys
    ids = torch.tensor([[5, 60, 700, 42]])
    model.eval()
    other.eval()
    with torch.no_grad():
        torch.testing.assert_close(other(ids).logits, model(ids).logits)


def test_gradient_checkpointing_switches(lora_4bit):
    model = lora_4bit[0]
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.model.gradient_checkpointing is True
    model.activation_checkpointing_enable(offload=True)
    assert model.model.gradient_checkpointing == "offload"
    model.activation_checkpointing_enable()  # Trainer's call keeps the offload policy
    assert model.model.gradient_checkpointing == "offload"
    with pytest.raises(ConfigError, match="every_n_layers"):
        model.gradient_checkpointing_enable(every_n_layers=2)
