"""Masking: only what the assistant says (and the marker that ends its turn) is trained on, in every template."""

import copy

import pytest

from velotune.data import BUILTIN_TEMPLATES, DataConfig, render_prompt, to_messages
from velotune.data.dataset import tokenize_row
from velotune.data.masking import IGNORE, tokenize_conversation, tokenize_text
from velotune.data.templates import builtin_template, resolve_template
from velotune.errors import DataError

MULTI_TURN = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Name a primary colour."},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "And another?"},
    {"role": "assistant", "content": "Blue, or yellow\nif you prefer."},
]


def test_alpaca_targets_are_exactly_the_output_and_end_of_turn(tokenizer, targets):
    row = {"instruction": "What is the capital of France?", "input": "", "output": "Paris."}
    ids, labels = tokenize_row(row, "alpaca", tokenizer, tokenizer.chat_template, DataConfig(), "d:1")
    assert targets(ids, labels) == ["Paris.<|im_end|>"]
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\nParis.<|im_end|>\n")


def test_every_assistant_turn_is_a_target_in_multi_turn(tokenizer, targets):
    ids, labels = tokenize_conversation(MULTI_TURN, tokenizer, tokenizer.chat_template)
    assert targets(ids, labels) == ["Red.<|im_end|>", "Blue, or yellow\nif you prefer.<|im_end|>"]


def test_assistant_text_with_outer_whitespace_is_kept_whole(tokenizer, targets):
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": " spaced \n"}]
    ids, labels = tokenize_conversation(messages, tokenizer, tokenizer.chat_template)
    assert targets(ids, labels) == [" spaced \n<|im_end|>"]


def test_train_on_all_labels_every_token(tokenizer):
    ids, labels = tokenize_conversation(MULTI_TURN, tokenizer, tokenizer.chat_template, train_on="all")
    assert labels == ids


def test_text_rows_train_on_all_tokens_and_end_with_eos(tokenizer):
    ids, labels = tokenize_text("Once upon a time", tokenizer)
    assert labels == ids
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids) == "Once upon a time" + tokenizer.eos_token


def test_reasoning_row_trains_on_thinking_and_answer(tokenizer, targets):
    row = {"Question": "What is 2+2?", "Complex_CoT": "Two plus two is four.", "Response": "4"}
    ids, labels = tokenize_row(row, "reasoning", tokenizer, tokenizer.chat_template, DataConfig(), "d:1")
    assert targets(ids, labels) == ["<think>\nTwo plus two is four.\n</think>\n\n4<|im_end|>"]


def test_system_prompt_is_added_only_when_the_row_has_none(tokenizer):
    cfg = DataConfig(system_prompt="You are terse.")
    ids, _ = tokenize_row(
        {"prompt": "p", "completion": "c"}, "prompt_completion", tokenizer, tokenizer.chat_template, cfg, "d:1"
    )
    assert tokenizer.decode(ids).startswith("<|im_start|>system\nYou are terse.<|im_end|>")
    ids, _ = tokenize_row(
        {"prompt": "p", "completion": "c", "system": "Own."},
        "prompt_completion",
        tokenizer,
        tokenizer.chat_template,
        cfg,
        "d:1",
    )
    assert "You are terse." not in tokenizer.decode(ids)


def _with_special_tokens(tokenizer, name: str):
    """The test tokenizer, given the template family's markers as single tokens (as the family's tokenizer has)."""
    tok = copy.deepcopy(tokenizer)
    tok.add_tokens(list(BUILTIN_TEMPLATES[name].special_tokens), special_tokens=True)
    return tok


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_builtin_template_targets_are_assistant_turns_and_end_of_turn(tokenizer, name):
    tok = _with_special_tokens(tokenizer, name)
    template = builtin_template(name)
    ids, labels = tokenize_conversation(MULTI_TURN, tok, template.source)
    stop = template.stop_text(tok)
    spans, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE:
            current.append(token)
        elif current:
            spans.append(tok.decode(current))
            current = []
    spans += [tok.decode(current)] if current else []
    assert spans == [f"Red.{stop}", f"Blue, or yellow\nif you prefer.{stop}"]
    # The prompt rendered for generation is the conversation up to where the last reply starts.
    prompt = render_prompt(MULTI_TURN[:-1], tok, name)
    assert tok.decode(ids).startswith(prompt)
    assert tok.decode(ids)[len(prompt) :].startswith("Blue, or yellow")


def test_template_name_overrides_the_tokenizer_template(tokenizer):
    prompt = render_prompt([{"role": "user", "content": "hi"}], tokenizer, "llama-3")
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert "<|im_start|>" not in prompt


def test_render_prompt_uses_tokenizer_template_and_system_prompt(tokenizer):
    prompt = render_prompt([{"role": "user", "content": "hi"}], tokenizer, system_prompt="Be kind.")
    assert prompt == "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tokenizer_without_chat_template_asks_for_template(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    with pytest.raises(
        DataError,
        match=r"has no chat template, and no chat_template is set; set chat_template to one "
        r"of: .*chatml",
    ):
        resolve_template(tok)
    assert resolve_template(tok, "chatml") == BUILTIN_TEMPLATES["chatml"].source


def test_template_that_rewrites_history_falls_back_to_locating_the_text(tokenizer, targets):
    # Like published DeepSeek-R1/Qwen3 templates: earlier assistant turns lose their <think> block.
    template = (
        "{%- for m in messages -%}"
        "{%- set c = m['content'] if loop.last or m['role'] != 'assistant' else m['content'].split('</think>')[-1] -%}"
        "{{- '<|im_start|>' + m['role'] + '\\n' + c + '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "<think>x</think>A"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "<think>y</think>B"},
    ]
    ids, labels = tokenize_conversation(messages, tokenizer, template)
    assert targets(ids, labels) == ["A<|im_end|>", "<think>y</think>B<|im_end|>"]


def test_template_error_names_the_row(tokenizer):
    template = "{{ raise_exception('roles must alternate') }}"
    messages = to_messages({"prompt": "p", "completion": "c"}, "prompt_completion", "d:9")
    with pytest.raises(
        DataError,
        match=r"d:9: the chat template cannot render this conversation .*roles must "
        r"alternate",
    ):
        tokenize_conversation(messages, tokenizer, template, source="d:9")
