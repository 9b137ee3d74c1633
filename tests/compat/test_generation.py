"""model.generate(): transformers' arguments and results, checked against transformers' own generate on the same
weights, and batched rows against the same rows one at a time."""

from __future__ import annotations

import pytest
import torch

from velotune.compat import FastLanguageModel
from velotune.errors import ConfigError
from velotune.models.generate import generate as velotune_generate


@pytest.fixture(scope="module")
def fp32_pair(tiny_model_dir):
    """(velotune model, tokenizer, transformers LlamaForCausalLM) on the same float32 weights."""
    from transformers import LlamaForCausalLM

    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir), load_in_4bit=False, dtype=torch.float32)
    hf = LlamaForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    return FastLanguageModel.for_inference(model), tok, hf


PROMPTS = ["The weather today", "Once upon a time in a land far away there", "1 2 3"]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"repetition_penalty": 1.3},
        {"no_repeat_ngram_size": 2},
        {"repetition_penalty": 1.2, "no_repeat_ngram_size": 3},
    ],
)
def test_greedy_generation_matches_transformers(fp32_pair, options):
    model, tok, hf = fp32_pair
    for prompt in PROMPTS:
        enc = tok(prompt, return_tensors="pt")
        ours = model.generate(**enc, max_new_tokens=12, **options)
        theirs = hf.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id, **options)
        assert ours.tolist() == theirs.tolist(), prompt


def test_single_prompt_matches_velotune_generator(fp32_pair):
    model, tok, _ = fp32_pair
    ids = tok(PROMPTS[1])["input_ids"]
    out = model.generate(torch.tensor([ids]), max_new_tokens=10, eos_token_id=[])
    assert out[0, len(ids) :].tolist() == velotune_generate(model.model, ids, max_new_tokens=10)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_rows_one_at_a_time(fp32_pair, side):
    model, tok, _ = fp32_pair
    tok.padding_side = side
    try:
        enc = tok(PROMPTS, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = "right"
    out = model.generate(**enc, max_new_tokens=8, eos_token_id=[])
    width = enc["input_ids"].shape[1]
    for b, prompt in enumerate(PROMPTS):
        alone = model.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=8, eos_token_id=[])
        assert out[b, width:].tolist() == alone[0, -8:].tolist(), prompt


def test_rows_stop_at_eos_and_are_padded(fp32_pair):
    model, tok, _ = fp32_pair
    enc = tok(PROMPTS[:2], return_tensors="pt", padding=True)
    free = model.generate(**enc, max_new_tokens=6, eos_token_id=[])
    width = enc["input_ids"].shape[1]
    stop = int(free[0, width])  # row 0's first new token becomes the EOS
    out = model.generate(**enc, max_new_tokens=6, eos_token_id=stop, pad_token_id=0)
    assert out[0, width:].tolist() == [stop] + [0] * (out.shape[1] - width - 1)
    if stop not in free[1, width:].tolist():
        assert out[1, width:].tolist() == free[1, width : out.shape[1]].tolist()


def test_sampling_is_seeded_and_top_k_1_is_greedy(fp32_pair):
    model, tok, _ = fp32_pair
    enc = tok(PROMPTS[0], return_tensors="pt")
    greedy = model.generate(**enc, max_new_tokens=8)
    torch.manual_seed(0)
    a = model.generate(**enc, max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9, min_p=0.01)
    torch.manual_seed(0)
    b = model.generate(**enc, max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9, min_p=0.01)
    assert a.tolist() == b.tolist()
    assert model.generate(**enc, max_new_tokens=8, do_sample=True, top_k=1).tolist() == greedy.tolist()
    # temperature without do_sample is greedy, as in transformers
    assert model.generate(**enc, max_new_tokens=8, temperature=2.0).tolist() == greedy.tolist()


def test_streamer_gets_the_prompt_then_each_token(fp32_pair):
    from transformers import TextStreamer

    class Collect(TextStreamer):
        def __init__(self, tokenizer):
            super().__init__(tokenizer, skip_prompt=True)
            self.pieces, self.ended = [], False

        def on_finalized_text(self, text, stream_end=False):
            self.pieces.append(text)
            self.ended |= stream_end

    model, tok, _ = fp32_pair
    enc = tok(PROMPTS[0], return_tensors="pt")
    streamer = Collect(tok)
    out = model.generate(**enc, streamer=streamer, max_new_tokens=6, eos_token_id=[])
    assert streamer.ended and "".join(streamer.pieces) == tok.decode(out[0, enc["input_ids"].shape[1] :])
    with pytest.raises(ConfigError, match="streamer"):
        model.generate(**tok(PROMPTS, return_tensors="pt", padding=True), streamer=Collect(tok), max_new_tokens=2)


def test_unsupported_generation_options_raise(fp32_pair):
    model, tok, _ = fp32_pair
    enc = tok(PROMPTS[0], return_tensors="pt")
    for kwargs, named in (({"num_beams": 4}, "num_beams"), ({"guidance_scale": 2.0}, "guidance_scale")):
        with pytest.raises(ConfigError, match=named):
            model.generate(**enc, max_new_tokens=2, **kwargs)
