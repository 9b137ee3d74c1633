"""Formats: rows of every supported layout become the same canonical conversation; bad rows say what is missing."""

import pytest

from velotune.data import detect_format, to_messages
from velotune.data.formats import apply_field_map
from velotune.errors import DataError


def conv(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": r, "content": c} for r, c in turns]


def test_alpaca_joins_instruction_and_input_and_keeps_system():
    row = {"instruction": "Translate.", "input": "chat", "output": "cat", "system": "Be terse."}
    assert to_messages(row, "alpaca", "d:1") == conv(
        ("system", "Be terse."), ("user", "Translate.\n\nchat"), ("assistant", "cat")
    )
    assert to_messages({"instruction": "Hi", "input": "", "output": "Yo"}, "alpaca", "d:1") == conv(
        ("user", "Hi"), ("assistant", "Yo")
    )


def test_sharegpt_roles_map_to_canonical_roles():
    row = {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "Q1"},
            {"from": "gpt", "value": "A1"},
            {"from": "human", "value": "Q2"},
            {"from": "gpt", "value": "A2"},
        ]
    }
    assert to_messages(row, "sharegpt", "d:1") == conv(
        ("system", "S"), ("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2")
    )


def test_messages_accept_text_content_parts():
    row = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": "c"},
        ]
    }
    assert to_messages(row, "messages", "d:1") == conv(("user", "ab"), ("assistant", "c"))


def test_prompt_completion_as_text_or_turn_lists():
    assert to_messages({"prompt": "P", "completion": "C"}, "prompt_completion", "d:1") == conv(
        ("user", "P"), ("assistant", "C")
    )
    row = {"prompt": [{"role": "user", "content": "P"}], "completion": [{"role": "assistant", "content": "C"}]}
    assert to_messages(row, "prompt_completion", "d:1") == conv(("user", "P"), ("assistant", "C"))


def test_reasoning_renders_thinking_before_answer():
    row = {"Question": "2+2?", "Complex_CoT": " Add them. \n", "Response": "4"}
    assert detect_format(row) == "reasoning"
    assert to_messages(row, "reasoning", "d:1") == conv(
        ("user", "2+2?"), ("assistant", "<think>\nAdd them.\n</think>\n\n4")
    )


def test_text_row_is_one_assistant_message():
    assert to_messages({"text": "Once upon a time"}, "text", "d:1") == conv(("assistant", "Once upon a time"))


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"instruction": "i", "input": "", "output": "o"}, "alpaca"),
        ({"conversations": [], "id": 3}, "sharegpt"),
        ({"messages": []}, "messages"),
        ({"prompt": "p", "completion": "c"}, "prompt_completion"),
        ({"question": "q", "thinking": "t", "answer": "a"}, "reasoning"),
        ({"text": "t", "meta": 1}, "text"),
    ],
)
def test_format_is_detected_from_fields(row, expected):
    assert detect_format(row) == expected


def test_field_map_renames_fields_before_detection():
    row = apply_field_map({"query": "q", "reply": "r"}, {"query": "instruction", "reply": "output"})
    assert detect_format(row) == "alpaca"
    assert to_messages(row, "auto", "d:1") == conv(("user", "q"), ("assistant", "r"))


def test_undetectable_row_lists_fields_found_and_formats_expected():
    with pytest.raises(
        DataError,
        match=r"d:7: cannot tell the data format from the fields \(q, a\).*alpaca "
        r"\(instruction, output\).*field_map",
    ):
        detect_format({"q": 1, "a": 2}, "d:7")


def test_missing_field_names_row_fields_needed_and_present():
    with pytest.raises(
        DataError,
        match=r'data.jsonl:41: missing "output"; alpaca rows need instruction and output '
        r"\(this row has: instruction, answer\)",
    ):
        to_messages({"instruction": "i", "answer": "a"}, "alpaca", "data.jsonl:41")


def test_null_required_field_is_reported():
    with pytest.raises(DataError, match=r'd:2: field "output" is null; expected text'):
        to_messages({"instruction": "i", "output": None}, "alpaca", "d:2")


def test_unknown_role_is_reported_with_known_roles():
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]}
    with pytest.raises(DataError, match=r"d:3: turn 1 has role 'tool'; expected one of: .*assistant"):
        to_messages(row, "messages", "d:3")


def test_empty_conversation_is_reported():
    with pytest.raises(DataError, match=r'd:4: "conversations" is an empty list'):
        to_messages({"conversations": []}, "sharegpt", "d:4")
