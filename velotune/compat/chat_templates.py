"""Chat-template helpers of the tutorials: get_chat_template, train_on_responses_only, standardize_sharegpt.

get_chat_template sets one of velotune's built-in templates (velotune.data.templates) on a tokenizer.
train_on_responses_only wraps a trainer's data collator so that only assistant replies carry loss; the trainer
class is not touched. For datasets prepared by velotune itself, masking is built in (data: train_on: responses).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from jinja2 import TemplateError

from velotune.data.masking import IGNORE
from velotune.data.templates import BUILTIN_TEMPLATES, ChatTemplate, builtin_template
from velotune.errors import DataError

_IDENTITY_MAPPING = {"role": "role", "content": "content", "user": "user", "assistant": "assistant"}


def _missing_markers(template: ChatTemplate, vocab: dict[str, int]) -> list[str]:
    return [t for t in template.special_tokens if t not in vocab]


def get_chat_template(
    tokenizer: Any,
    chat_template: str | tuple[str, str] = "chatml",
    mapping: dict[str, str] | None = None,
    map_eos_token: bool = True,
    system_message: str | None = None,
) -> Any:
    """`tokenizer` with the built-in template `chat_template` (llama-3, chatml, gemma, mistral, deepseek-r1, alpaca,
    or the aliases llama3, qwen, deepseek) as its chat_template; a (jinja_source, end_of_turn) pair sets a custom one.

    map_eos_token=True makes the template's end-of-turn marker the tokenizer's EOS token, so `tokenizer.eos_token`
    in formatting functions, the trainer's stop token and exported models all agree on where a reply ends.
    Raises DataError when the tokenizer lacks the template's marker tokens (velotune does not add tokens).
    """
    if mapping is not None and dict(mapping) != _IDENTITY_MAPPING:
        raise DataError(
            f"get_chat_template(mapping={mapping}) is not supported; convert ShareGPT rows (from/value) to "
            "role/content first with velotune.compat.standardize_sharegpt(dataset)"
        )
    if system_message is not None:
        raise DataError("get_chat_template(system_message=...) is not supported; add a system turn to the data")
    if isinstance(chat_template, tuple):
        source, end = chat_template
        template = ChatTemplate("custom", source, end)
    else:
        template = builtin_template(chat_template)
    vocab = tokenizer.get_vocab()
    missing = _missing_markers(template, vocab)
    if missing:
        usable = sorted(n for n, t in BUILTIN_TEMPLATES.items() if not _missing_markers(t, vocab))
        raise DataError(
            f"chat template {template.name!r} needs the tokens {missing}, which this tokenizer does not have "
            f"(velotune does not grow the vocabulary); templates that fit this tokenizer: {', '.join(usable)}"
        )
    tokenizer.chat_template = template.source
    end = template.stop_text(tokenizer)
    if map_eos_token and end is not None and end in vocab and end != tokenizer.eos_token:
        tokenizer.eos_token = end
    return tokenizer


def end_of_turn_token(tokenizer: Any) -> int | None:
    """The token id that closes an assistant turn in the tokenizer's chat template; EOS without a template.

    Found by rendering a two-turn conversation and taking the first special token after the assistant's text.
    """
    eos = tokenizer.eos_token_id
    if not getattr(tokenizer, "chat_template", None):
        return eos
    marker = "\ue000"  # private-use character: appears in no template
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": marker}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except (TemplateError, ValueError) as exc:
        raise DataError(f"the tokenizer's chat template cannot render a user/assistant exchange: {exc}") from exc
    after = text[text.index(marker) + len(marker) :]
    special = set(tokenizer.all_special_ids) | {
        i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)
    }
    for tok in tokenizer(after, add_special_tokens=False)["input_ids"]:
        if tok in special:
            return tok
    return eos


def _find(row: list[int], pattern: list[int]) -> list[int]:
    """Start indices of `pattern` in `row`."""
    n = len(pattern)
    first = pattern[0]
    return [i for i in range(len(row) - n + 1) if row[i] == first and row[i : i + n] == pattern]


class ResponsesOnlyCollator:
    """Wraps a data collator: labels outside assistant replies become -100.

    A reply starts after each occurrence of `response_part` and ends where the next `instruction_part` begins (or
    at the end of the row); everything else, the markers themselves included, is masked. A batch in which no row
    contains `response_part` raises DataError, since it would train on nothing.
    """

    def __init__(self, collator: Callable, tokenizer: Any, instruction_part: str, response_part: str) -> None:
        self.collator = collator
        self.tokenizer = tokenizer
        self.instruction_part, self.response_part = instruction_part, response_part
        self.instruction_ids = self._ids(instruction_part)
        self.response_ids = self._ids(response_part)

    def _ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise DataError(f"train_on_responses_only: {text!r} tokenizes to nothing")
        return list(ids)

    def _mask_row(self, ids: list[int], labels: list[int]) -> tuple[list[int], bool]:
        starts = [s + len(self.response_ids) for s in _find(ids, self.response_ids)]
        ends = _find(ids, self.instruction_ids)
        keep = [False] * len(ids)
        for s in starts:
            stop = next((e for e in ends if e >= s), len(ids))
            keep[s:stop] = [True] * (stop - s)
        return [lab if k else IGNORE for lab, k in zip(labels, keep, strict=True)], bool(starts)

    def __call__(self, features: list[Any]) -> dict[str, Any]:
        batch = self.collator(features)
        ids, labels = batch["input_ids"], batch["labels"]
        masked, found = [], False
        for row_ids, row_labels in zip(ids.tolist(), labels.tolist(), strict=True):
            row, hit = self._mask_row(row_ids, row_labels)
            masked.append(row)
            found |= hit
        if not found:
            raise DataError(
                f"train_on_responses_only: response_part {self.response_part!r} (tokens {self.response_ids}) occurs "
                f"in no row of this batch, so nothing would be trained; it must match the chat template's text "
                f"exactly, e.g. {self.tokenizer.decode(ids[0][:48])!r}"
            )
        batch["labels"] = torch.tensor(masked, dtype=labels.dtype, device=labels.device)
        return batch


def train_on_responses_only(
    trainer: Any,
    instruction_part: str | None = None,
    response_part: str | None = None,
    tokenizer: Any = None,
    **kwargs: Any,
) -> Any:
    """Make `trainer` (transformers.Trainer or trl.SFTTrainer) train on assistant replies only; returns it.

    instruction_part / response_part are the texts that open a user turn and an assistant turn, e.g. for ChatML
    "<|im_start|>user\\n" and "<|im_start|>assistant\\n", for Llama 3 "<|start_header_id|>user<|end_header_id|>\\n\\n"
    and "<|start_header_id|>assistant<|end_header_id|>\\n\\n". The trainer's data_collator is wrapped.
    """
    unknown = sorted(set(kwargs) - {"force_match", "num_proc", "return_function"})
    if unknown:
        raise DataError(f"train_on_responses_only() got unexpected arguments {unknown}")
    if kwargs.get("return_function"):
        raise DataError("train_on_responses_only(return_function=True) is not supported; pass the trainer")
    if not instruction_part or not response_part:
        raise DataError(
            "train_on_responses_only needs instruction_part and response_part, the texts opening a user and an "
            "assistant turn (ChatML: '<|im_start|>user\\n' and '<|im_start|>assistant\\n')"
        )
    tok = tokenizer or getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer", None)
    if tok is None:
        raise DataError("train_on_responses_only: the trainer has no tokenizer; pass tokenizer=")
    tok = getattr(tok, "tokenizer", tok)  # a processor's tokenizer
    trainer.data_collator = ResponsesOnlyCollator(trainer.data_collator, tok, instruction_part, response_part)
    return trainer


def standardize_sharegpt(dataset: Any, column: str = "conversations") -> Any:
    """ShareGPT rows ({"from": "human"|"gpt"|"system", "value": ...}) as role/content messages, for chat templates."""
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

    def convert(row: dict[str, Any]) -> dict[str, Any]:
        out = []
        for turn in row[column]:
            role = turn.get("from", turn.get("role"))
            if role not in roles:
                raise DataError(f"standardize_sharegpt: unknown role {role!r}; expected one of {', '.join(roles)}")
            out.append({"role": roles[role], "content": turn.get("value", turn.get("content"))})
        return {column: out}

    return dataset.map(convert)
