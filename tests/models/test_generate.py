"""The generation engine: a batch of mixed-length prompts decodes as each prompt alone and as transformers' generate
on the same weights (every family; windows crossed, soft-caps), with LoRA on and off and with a 4-bit base;
sampling is seeded; log-probs equal a forward pass's; stop strings cut exactly; finished rows leave the batch;
bad requests fail with one message."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.helpers import velotune_from_hf
from tests.models.test_families import hf_model, randomized_hf_model
from velotune.errors import ConfigError
from velotune.lora.apply import disable_adapters, get_peft_model, lora_layers, merge_lora
from velotune.models.generate import SamplingParams, generate_batch

PROMPTS = [[5, 17, 9], [3, 44, 12, 90, 7, 61, 23, 8, 100, 2, 71], [30, 31, 32, 33, 34, 35]]
NEW = 8  # 11 + 8 tokens cross the tiny models' window of 8


def _llama():
    from tests.conftest import tiny_llama_config

    return randomized_hf_model(tiny_llama_config(attn_implementation="eager"))


def _hf_greedy(hf, prompt: list[int], new: int = NEW) -> list[int]:
    hf.generation_config.eos_token_id = None  # no early stop: compare all `new` tokens
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


def _tokens(model, prompts, **params) -> list[list[int]]:
    return [c.tokens for c in generate_batch(model, prompts, SamplingParams(**params))]


def _assert_batch_is_rows_alone(model, prompts=PROMPTS, new=NEW) -> list[list[int]]:
    batch = _tokens(model, prompts, max_new_tokens=new)
    assert batch == [_tokens(model, [p], max_new_tokens=new)[0] for p in prompts]
    return batch


@pytest.mark.parametrize("case", ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3"])
def test_greedy_batch_equals_each_prompt_alone_and_transformers(case):
    hf = _llama() if case == "llama" else hf_model(case)
    ours = velotune_from_hf(hf)
    batch = _assert_batch_is_rows_alone(ours)
    assert batch == [_hf_greedy(hf, p) for p in PROMPTS]


def _lora_model(hf):
    model = get_peft_model(velotune_from_hf(hf), r=4, lora_alpha=8)
    gen = torch.Generator().manual_seed(3)
    for layer in lora_layers(model).values():
        layer.lora_B.data.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.5)
    return model


def test_lora_on_equals_the_merged_model_and_off_equals_the_base():
    hf = _llama()
    tuned = _lora_model(hf)
    with_lora = _assert_batch_is_rows_alone(tuned)
    assert with_lora == _tokens(merge_lora(copy.deepcopy(tuned)), PROMPTS, max_new_tokens=NEW)
    with disable_adapters(tuned):
        off = _assert_batch_is_rows_alone(tuned)
    assert off == [_hf_greedy(hf, p) for p in PROMPTS]
    assert off != with_lora


def test_4bit_base_batch_equals_rows_alone_and_transformers_on_its_weights():
    from velotune.quant.apply import dequantize_model, quantize_model

    hf = _llama()
    ours = quantize_model(velotune_from_hf(hf), "nf4", compute_dtype=torch.float32, progress=False)
    batch = _assert_batch_is_rows_alone(ours)
    dequantized = dequantize_model(copy.deepcopy(ours), torch.float32)
    hf.load_state_dict(dequantized.state_dict())  # the weights the 4-bit model computes with
    assert batch == [_hf_greedy(hf, p) for p in PROMPTS]


@pytest.fixture(scope="module")
def llama():
    return velotune_from_hf(_llama())


def test_seeded_sampling_is_reproducible_and_seeds_differ(llama):
    params = dict(max_new_tokens=12, temperature=1.5, top_k=40, top_p=0.95, min_p=0.01, num_return_sequences=2)
    a = _tokens(llama, PROMPTS, seed=7, **params)
    assert a == _tokens(llama, PROMPTS, seed=7, **params)
    assert a != _tokens(llama, PROMPTS, seed=8, **params)
    assert len(a) == 2 * len(PROMPTS) and a[0] != a[1]  # two different samples of the first prompt


@pytest.mark.parametrize("case", ["llama", "gemma2"])  # gemma2: soft-capped final logits, window crossed
def test_logprobs_equal_a_forward_pass_over_the_finished_sequence(case, llama):
    model = llama if case == "llama" else velotune_from_hf(hf_model(case))
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=0, return_logprobs=True, num_return_sequences=2)
    _assert_logprobs_of_a_forward(model, PROMPTS, generate_batch(model, PROMPTS, params), rtol=1e-5, atol=1e-6)


def _assert_logprobs_of_a_forward(model, prompts, completions, rtol, atol):
    for c in completions:
        prompt = prompts[c.prompt_index]
        ids = torch.tensor([prompt + c.tokens], device=model.device)
        labels = ids.clone()
        labels[:, : len(prompt)] = -100
        with torch.no_grad():
            expected = model(ids, labels=labels, return_logps=True).token_logps[0, len(prompt) - 1 :]
        torch.testing.assert_close(torch.tensor(c.logprobs), expected.cpu(), rtol=rtol, atol=atol)


def test_num_return_sequences_prefills_each_prompt_once(llama):
    shapes = []
    hook = llama.model.embed_tokens.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    try:
        done = generate_batch(llama, PROMPTS, SamplingParams(max_new_tokens=4, num_return_sequences=3))
    finally:
        hook.remove()
    assert shapes[0] == (3, 11) and shapes[1:] == [(9, 1)] * 3  # one prefill of 3 prompts, then 9 rows per step
    assert [c.prompt_index for c in done] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    alone = _tokens(llama, PROMPTS, max_new_tokens=4)
    assert [c.tokens for c in done] == [t for t in alone for _ in range(3)]  # greedy: n equal rows


@pytest.mark.parametrize("sync_every", [1, 4])
def test_finished_rows_leave_the_batch_and_the_rest_decode_unchanged(llama, sync_every):
    prompts = PROMPTS + [[9, 8, 7, 6]]
    free = _tokens(llama, prompts, max_new_tokens=NEW)
    eos = [free[0][0], free[2][1]]  # row 0 stops at its first token, row 2 at its second
    shapes = []
    hook = llama.model.embed_tokens.register_forward_hook(lambda m, args, out: shapes.append(args[0].shape[0]))
    try:
        params = SamplingParams(max_new_tokens=NEW, eos_token_ids=eos)
        done = generate_batch(llama, prompts, params, sync_every=sync_every)
    finally:
        hook.remove()
    for c, row in zip(done, free, strict=True):
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        assert c.tokens == row[:end] and c.finish_reason == ("eos" if c.tokens[-1] in eos else "length")
    assert min(shapes) < len(prompts)  # decoding went on with fewer rows


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tiny_model_dir):
    from velotune.models.load import load_model

    return load_model(str(tiny_model_dir))


@pytest.mark.parametrize("sync_every", [1, 5])
def test_stop_strings_cut_the_text_exactly(tiny_with_tokenizer, sync_every):
    model, tok = tiny_with_tokenizer
    prompt = tok("The weather today is")["input_ids"]
    free = generate_batch(model, [prompt], SamplingParams(max_new_tokens=20), tokenizer=tok)[0]
    stop = free.text[6:9]
    assert stop.strip(), free.text
    cut = free.text.find(stop)
    params = SamplingParams(max_new_tokens=20, stop_strings=[stop, "no such text"])
    done = generate_batch(model, [prompt], params, tokenizer=tok, sync_every=sync_every)[0]
    assert done.finish_reason == "stop" and done.text == free.text[:cut]
    assert done.tokens == free.tokens[: len(done.tokens)]  # ends with the token that completed the stop string
    assert stop in tok.decode(done.tokens) and stop not in tok.decode(done.tokens[:-1])


def test_bad_requests_fail_with_one_clear_message(llama):
    context = llama.config.max_position_embeddings
    cases = [
        ([[5, 6], []], {}, "prompt 1 is empty"),
        ([[5, 6]], {"max_new_tokens": 0}, "max_new_tokens=0: generate at least 1 token"),
        ([list(range(1, 100)) * 3], {}, f"prompt 0 has 297 tokens; the model's context is {context} tokens"),
        ([[5, 6]], {"top_p": 0.0}, r"top_p=0.0 is outside \(0, 1\]"),
        ([[5, 6]], {"top_p": 1.5}, r"top_p=1.5 is outside \(0, 1\]"),
        ([[5, 6]], {"stop_strings": ["x"]}, "stop_strings need the tokenizer"),
    ]
    for prompts, params, message in cases:
        with pytest.raises(ConfigError, match=message):
            generate_batch(llama, prompts, SamplingParams(**params))


def test_rows_stop_at_the_context(llama):
    context = llama.config.max_position_embeddings
    prompt = [7] * (context - 3)
    done = generate_batch(llama, [prompt, [5, 6]], SamplingParams(max_new_tokens=6))
    assert [len(c.tokens) for c in done] == [3, 6] and done[0].finish_reason == "length"


def test_cli_bad_values_exit_2_before_loading_a_model(capsys):
    from velotune.cli.main import main

    for argv, message in (
        (["--prompt", " "], "--prompt is empty"),
        (["--prompt", "hi", "--top_p", "1.5"], "top_p=1.5 is outside (0, 1]"),
        (["--prompt", "hi", "--max_new_tokens", "0"], "max_new_tokens=0"),
    ):
        assert main(["generate", "/nonexistent/model", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1


LONG = [(7 * i) % 127 + 1 for i in range(200)]  # with 80 new tokens: past GRAPH_LENGTH_BUCKET (256 slots)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["llama", "mistral", "gemma3"])  # windows and Gemma 3's scaled embeddings
def test_cuda_graph_decoding_equals_eager_decoding(case):
    model = velotune_from_hf(_llama() if case == "llama" else hf_model(case)).cuda()
    params = SamplingParams(max_new_tokens=80, return_logprobs=True)
    graphs = generate_batch(model, PROMPTS + [LONG], params)
    eager = generate_batch(model, PROMPTS + [LONG], params, cuda_graphs=False)
    assert [c.tokens for c in graphs] == [c.tokens for c in eager]
    _assert_logprobs_of_a_forward(model, PROMPTS + [LONG], graphs, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_cuda_graph_decoding_in_bfloat16_has_a_forward_pass_logprobs():
    model = velotune_from_hf(_llama(), torch.bfloat16).cuda()
    params = SamplingParams(max_new_tokens=80, temperature=1.0, seed=0, return_logprobs=True)
    done = generate_batch(model, PROMPTS + [LONG], params)
    _assert_logprobs_of_a_forward(model, PROMPTS + [LONG], done, rtol=0.05, atol=0.05)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["mistral", "gemma2", "gemma3"])
def test_cuda_batch_equals_rows_alone_with_windows_and_soft_caps(case):
    model = velotune_from_hf(hf_model(case)).cuda()
    _assert_batch_is_rows_alone(model, new=16)


@pytest.mark.gpu
def test_cuda_4bit_batch_equals_rows_alone_and_compaction_keeps_graphs_right():
    from velotune.quant.apply import quantize_model

    model = quantize_model(velotune_from_hf(_llama()).cuda(), "nf4", compute_dtype=torch.bfloat16, progress=False)
    free = _tokens(model, PROMPTS, max_new_tokens=40)
    _assert_batch_is_rows_alone(model, new=40)
    eos = [free[0][2], free[1][3]]  # two of three rows stop: the batch is compacted to one row, graphs recaptured
    done = generate_batch(model, PROMPTS, SamplingParams(max_new_tokens=40, eos_token_ids=eos), sync_every=2)
    for c, row in zip(done, free, strict=True):
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        assert c.tokens == row[:end]


@pytest.mark.gpu
def test_cuda_seeded_sampling_is_reproducible():
    model = velotune_from_hf(_llama()).cuda()
    params = dict(max_new_tokens=30, temperature=1.0, top_p=0.9, seed=1, num_return_sequences=4)
    assert _tokens(model, PROMPTS, **params) == _tokens(model, PROMPTS, **params)


@pytest.mark.gpu
def test_a_request_too_large_for_the_gpu_says_how_many_rows_fit():
    model = velotune_from_hf(_llama()).cuda()
    rows = torch.cuda.mem_get_info()[0] // 50_000  # each row needs > 130 kB (2 layers x k, v x 2 x 16 x fp32 x 253)
    with pytest.raises(ConfigError, match=r"at most \d+ rows fit"):
        generate_batch(model, [[1, 2, 3]] * rows, SamplingParams(max_new_tokens=252))
