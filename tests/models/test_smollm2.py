"""The embedded SmolLM2-135M-Instruct GGUF through velotune's own import."""

import math

import torch

from velotune.data import render_prompt
from velotune.models.generate import generate, stop_token_ids

TEXT = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital and most populous city of France. "
    "Water boils at one hundred degrees Celsius at sea level."
)


def test_answers_capital_of_france(smollm2):
    model, tok = smollm2
    prompt = render_prompt([{"role": "user", "content": "What is the capital of France?"}], tok)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    answer = tok.decode(generate(model, ids, max_new_tokens=12, eos_token_id=stop_token_ids(tok)))
    assert "Paris" in answer


def test_perplexity_equals_transformers_gguf_loader(smollm2):
    """Our GGUF import against transformers' own GGUF loader on the same file (measured 2026-11-23: 23.29 both;
    a raw-text perplexity for a 135M instruct model; uniform guessing would be 49152)."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import smollm2_gguf

    model, tok = smollm2
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    path = smollm2_gguf()
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        ppl = math.exp(float(model(ids, labels=ids).loss))
        ref = math.exp(float(hf(input_ids=ids, labels=ids).loss))
    print(f"SmolLM2 perplexity: velotune {ppl:.3f}, transformers {ref:.3f}")
    assert abs(ppl - ref) / ref < 1e-3
    assert ppl < 40
