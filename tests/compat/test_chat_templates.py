"""get_chat_template, end-of-turn detection, train_on_responses_only (collator wrapper) and standardize_sharegpt."""

from __future__ import annotations

import copy

import pytest
import torch

from velotune.compat import get_chat_template, standardize_sharegpt, train_on_responses_only
from velotune.compat.chat_templates import ResponsesOnlyCollator, end_of_turn_token
from velotune.data.templates import BUILTIN_TEMPLATES
from velotune.errors import DataError

CHAT = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "6, of course."},
]


@pytest.fixture
def tok(loaded_4bit):
    return copy.deepcopy(loaded_4bit[1])


@pytest.mark.parametrize("name", ["chatml", "qwen", "alpaca"])
def test_builtin_template_is_set_on_the_tokenizer(tok, name):
    out = get_chat_template(tok, chat_template=name)
    assert out is tok
    key = {"qwen": "chatml"}.get(name, name)
    assert tok.chat_template == BUILTIN_TEMPLATES[key].source
    text = tok.apply_chat_template(CHAT, tokenize=False)
    assert "It is 4." in text and "6, of course." in text


def test_end_of_turn_becomes_eos_and_is_detected(tok):
    get_chat_template(tok, "chatml")
    assert tok.eos_token == "<|im_end|>" and end_of_turn_token(tok) == tok.convert_tokens_to_ids("<|im_end|>")
    get_chat_template(tok, "alpaca")  # closes replies with the tokenizer's EOS
    assert end_of_turn_token(tok) == tok.eos_token_id


def test_template_with_markers_the_tokenizer_lacks_is_refused(tok):
    with pytest.raises(DataError, match=r"<\|eot_id\|>.*chatml"):  # names what is missing and what fits
        get_chat_template(tok, chat_template="llama-3")


def test_unknown_template_and_sharegpt_mapping_are_refused(tok):
    with pytest.raises(DataError, match="unknown chat template"):
        get_chat_template(tok, chat_template="vicuna_old")
    with pytest.raises(DataError, match="standardize_sharegpt"):
        get_chat_template(
            tok, "chatml", mapping={"role": "from", "content": "value", "user": "human", "assistant": "gpt"}
        )


class _FakeTrainer:
    """What train_on_responses_only touches on a Trainer: data_collator and processing_class."""

    def __init__(self, collator, tokenizer):
        self.data_collator, self.processing_class = collator, tokenizer


def _lm_collator(features):
    ids = torch.tensor([f["input_ids"] for f in features])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_train_on_responses_only_keeps_exactly_the_replies(tok):
    get_chat_template(tok, "chatml")
    ids = tok.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    trainer = train_on_responses_only(
        _FakeTrainer(_lm_collator, tok),
        instruction_part="<|im_start|>user\n",
        response_part="<|im_start|>assistant\n",
    )
    assert isinstance(trainer.data_collator, ResponsesOnlyCollator)
    batch = trainer.data_collator([{"input_ids": ids}])
    kept = [t for t, lab in zip(ids, batch["labels"][0].tolist(), strict=True) if lab != -100]
    assert tok.decode(kept) == "It is 4.<|im_end|>\n6, of course.<|im_end|>\n"


def test_response_part_that_never_occurs_is_an_error(tok):
    get_chat_template(tok, "chatml")
    ids = tok.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    trainer = train_on_responses_only(_FakeTrainer(_lm_collator, tok), "<|im_start|>user\n", "### Response:\n")
    with pytest.raises(DataError, match="occurs in no row"):
        trainer.data_collator([{"input_ids": ids}])
    with pytest.raises(DataError, match="instruction_part and response_part"):
        train_on_responses_only(_FakeTrainer(_lm_collator, tok))


def test_standardize_sharegpt_gives_role_content():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(
        [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]
    )
    out = standardize_sharegpt(ds)
    assert out[0]["conversations"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
