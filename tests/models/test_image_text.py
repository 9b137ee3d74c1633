"""Image-text Gemma 3 checkpoints (Gemma 3 4B and up): velotune loads and trains the language model, with the
logits transformers' Gemma3ForConditionalGeneration gives for text-only input."""

from __future__ import annotations

import json

import pytest
import torch

from velotune.models.load import load_model

TEXT = dict(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    sliding_window=8,
    max_position_embeddings=256,
)


@pytest.fixture(scope="module")
def gemma3_image_text(tmp_path_factory):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    cfg = Gemma3Config(
        text_config=Gemma3TextConfig(**TEXT), vision_config=vision, mm_tokens_per_image=4, image_token_index=150
    )
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(cfg).eval()
    out = tmp_path_factory.mktemp("gemma3_it")
    model.save_pretrained(out)
    return model, out


def _ids(t: int = 20) -> torch.Tensor:
    return torch.randint(0, 140, (2, t), generator=torch.Generator().manual_seed(1))


def test_language_model_of_an_image_text_checkpoint_matches_transformers(gemma3_image_text):
    hf, path = gemma3_image_text
    ours, _ = load_model(path, with_tokenizer=False)
    assert ours.config.model_type == "gemma3_text" and ours.config.num_layers == 3
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids).logits, hf(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_sparse_text_config_is_completed_with_the_text_models_defaults(gemma3_image_text, tmp_path):
    """Released config.json files list only the text fields that differ from Gemma3TextConfig's defaults."""
    import shutil

    hf, path = gemma3_image_text
    shutil.copytree(path, tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    defaults = {"rms_norm_eps": 1e-6, "query_pre_attn_scalar": 256, "final_logit_softcapping": None}
    text = {k: v for k, v in cfg["text_config"].items() if k in TEXT or k == "model_type"}
    assert not set(defaults) & set(text)
    cfg["text_config"] = text
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    ours, _ = load_model(tmp_path / "m", with_tokenizer=False)
    assert ours.config.rms_norm_eps == 1e-6
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(_ids()).logits, hf(input_ids=_ids()).logits, rtol=1e-5, atol=1e-5)


def test_lora_training_on_the_language_model_lowers_the_loss(gemma3_image_text):
    from velotune.lora.apply import get_peft_model

    _, path = gemma3_image_text
    model, _ = load_model(path, with_tokenizer=False)
    get_peft_model(model, r=4, lora_alpha=8)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids()
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
