"""Preference pairs: every format becomes prompt/chosen/rejected tokens that concatenate to the tokenized conversation;
over-long pairs are cut and counted; every bad row is named (file:line) and counted, never silently dropped."""

import copy
import json

import pytest

from velotune.data import DataConfig, render_prompt
from velotune.data.preference import (
    build_preference_datasets,
    check_preference_file,
    check_preference_files,
    detect_preference,
    to_pair,
)
from velotune.data.templates import render, resolve_template
from velotune.errors import ConfigError, DataError

USER = {"role": "user", "content": "Write May 3, 2020 as an ISO date."}
STANDARD = {"prompt": USER["content"], "chosen": "2020-05-03", "rejected": "The date is May 3rd, 2020."}
CONVERSATIONAL = {
    "prompt": [{"role": "system", "content": "Answer with a date."}, USER],
    "chosen": [{"role": "assistant", "content": "2020-05-03"}],
    "rejected": [{"role": "assistant", "content": "2020-03-05"}],
}
IMPLICIT = {
    "chosen": [USER, {"role": "assistant", "content": "2020-05-03"}],
    "rejected": [USER, {"role": "assistant", "content": "05/03/2020"}],
}


def pair(i: int, chosen: str = "yes", rejected: str = "no", prompt: str | None = None) -> dict:
    return {"prompt": prompt or f"Question {i}?", "chosen": chosen, "rejected": rejected}


def conversation_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The rendered conversation up to its last end-of-turn marker, tokenized whole (the reference)."""
    text = render(messages, tokenizer, resolve_template(tokenizer)).rstrip()
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def build(tokenizer, path: str, **kwargs):
    return build_preference_datasets(DataConfig(path=path), tokenizer, **kwargs)


@pytest.mark.parametrize(
    ("row", "fmt", "prompt"),
    [
        (STANDARD, "standard", [USER]),
        (CONVERSATIONAL, "conversational", CONVERSATIONAL["prompt"]),
        (IMPLICIT, "implicit_prompt", [USER]),
    ],
    ids=["standard", "conversational", "implicit_prompt"],
)
def test_prompt_plus_answer_tokens_are_the_tokenized_conversation(tokenizer, write_jsonl, row, fmt, prompt):
    path = write_jsonl([row])
    train, eval_set = build(tokenizer, path)
    assert eval_set is None and train.stats.formats == {fmt: 1}
    (example,) = train
    assert example["row"] == f"{path}:1"
    assert all(type(t) is int for side in ("prompt_ids", "chosen_ids", "rejected_ids") for t in example[side])
    _, _, chosen, rejected = to_pair(row, "row")
    assert example["prompt_ids"] + example["chosen_ids"] == conversation_ids(tokenizer, prompt + chosen)
    assert example["prompt_ids"] + example["rejected_ids"] == conversation_ids(tokenizer, prompt + rejected)
    # the prompt is what generation starts from; each answer ends with the template's end-of-turn marker
    generation_prompt = render_prompt(prompt, tokenizer)
    assert example["prompt_ids"] == tokenizer(generation_prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(example["chosen_ids"]) == chosen[-1]["content"] + "<|im_end|>"
    assert tokenizer.decode(example["rejected_ids"]) == rejected[-1]["content"] + "<|im_end|>"
    assert train.stats.shifted == 0


def test_implicit_prompt_is_the_turns_both_conversations_share():
    history = [USER, {"role": "assistant", "content": "2020-05-03"}, {"role": "user", "content": "And a day later?"}]
    row = {
        "chosen": [*history, {"role": "assistant", "content": "2020-05-04"}],
        "rejected": [*history, {"role": "assistant", "content": "2020-05-02"}],
    }
    fmt, prompt, chosen, rejected = to_pair(row, "row")
    assert fmt == "implicit_prompt" and prompt == history
    assert chosen == [{"role": "assistant", "content": "2020-05-04"}]
    assert rejected == [{"role": "assistant", "content": "2020-05-02"}]


def test_system_field_and_system_prompt_become_the_system_message():
    _, prompt, _, _ = to_pair({**STANDARD, "system": "Be brief."}, "row", system_prompt="Ignored.")
    assert prompt[0] == {"role": "system", "content": "Be brief."}
    _, prompt, _, _ = to_pair(STANDARD, "row", system_prompt="Be brief.")
    assert prompt == [{"role": "system", "content": "Be brief."}, USER]


def test_field_map_and_aliases_name_the_prompt_and_answers(tokenizer, write_jsonl):
    row = {"question_text": "Q?", "good": "yes", "bad": "no"}
    field_map = {"question_text": "prompt", "good": "chosen", "bad": "rejected"}
    assert not detect_preference(row) and detect_preference(row, field_map)
    assert to_pair(row, "row", field_map)[1:] == to_pair(pair(0, prompt="Q?"), "row")[1:]
    assert to_pair({"Question": "Q?", "Chosen": "yes", "rejected": "no"}, "row") == to_pair(pair(0, prompt="Q?"), "row")
    # through DataConfig (which accepts prompt as a field_map target)
    path = write_jsonl([{"question_text": "Q?", "chosen": "yes", "rejected": "no"}])
    train, _ = build_preference_datasets(DataConfig(path=path, field_map={"question_text": "prompt"}), tokenizer)
    assert train.stats.rows_used == 1


def test_detect_preference_tells_pairs_from_sft_rows(write_jsonl):
    assert detect_preference(STANDARD) and detect_preference(IMPLICIT)
    assert not detect_preference({"instruction": "Q?", "output": "A"})
    assert check_preference_file(write_jsonl([STANDARD])) == "standard"
    assert check_preference_file(write_jsonl([IMPLICIT], "implicit.jsonl")) == "implicit_prompt"
    sft = write_jsonl([{"instruction": "Q?", "output": "A"}], "sft.jsonl")
    with pytest.raises(DataError, match=rf"{sft}:1: not preference data: .*instruction, output.*method sft"):
        check_preference_file(sft)
    with pytest.raises(DataError, match="file not found"):
        check_preference_files(DataConfig(path=str(write_jsonl([STANDARD])), eval_path="missing.jsonl"))
    with pytest.raises(DataError, match="no rows found"):
        check_preference_file(write_jsonl([""], "empty.jsonl"))


def test_long_prompt_keep_end_keeps_its_end_and_is_counted(tokenizer, write_jsonl):
    long_prompt = " ".join(f"w{i}" for i in range(200))
    path = write_jsonl([pair(0), pair(1, prompt=long_prompt)])
    full, _ = build(tokenizer, path, max_prompt_length=None)
    train, _ = build(tokenizer, path, max_prompt_length=64)
    assert (train.stats.prompt_cut, train.stats.truncated) == (1, 1)
    assert len(train[1]["prompt_ids"]) == 64
    assert train[1]["prompt_ids"] == full[1]["prompt_ids"][-64:]  # the end, next to the answer
    assert train[0] == full[0]
    assert "truncated 1 pairs: prompt cut to max_prompt_length 64 (keep_end) in 1" in train.report()
    start, _ = build(tokenizer, path, max_prompt_length=64, truncation_mode="keep_start")
    assert start[1]["prompt_ids"] == full[1]["prompt_ids"][:64]
    assert start.stats.prompt_cut == 1


def test_long_answers_are_cut_to_max_length_and_counted(tokenizer, write_jsonl):
    path = write_jsonl([pair(0), pair(1, chosen="yes " * 100, rejected="no " * 80)])
    full, _ = build(tokenizer, path)
    train, _ = build(tokenizer, path, max_length=60)
    room = 60 - len(full[1]["prompt_ids"])
    assert train[1]["chosen_ids"] == full[1]["chosen_ids"][:room]
    assert train[1]["rejected_ids"] == full[1]["rejected_ids"][:room]
    assert (train.stats.answers_cut, train.stats.truncated) == (1, 1)
    assert "answers cut to fit max_length 60 in 1" in train.report()
    assert max(train.lengths) == 60


def test_max_length_defaults_to_max_seq_length(tokenizer, write_jsonl):
    path = write_jsonl([pair(0, chosen="yes " * 100, rejected="no")])
    train, _ = build_preference_datasets(DataConfig(path=path, max_seq_length=64), tokenizer)
    assert train.stats.max_length == 64 and max(train.lengths) == 64


BAD_ROWS = [
    (pair(1, chosen=""), "empty chosen or rejected", r'"chosen" is empty'),
    (pair(1, rejected="  "), "empty chosen or rejected", r'"rejected" is empty'),
    (pair(1, chosen="same", rejected="same"), "chosen same as rejected", "chosen and rejected are the same"),
    ({"prompt": "Q?", "chosen": "yes"}, "missing fields", r'missing "rejected"; .*\(this row has: prompt, chosen\)'),
    ({"chosen": "yes", "rejected": "no"}, "missing fields", r'missing "prompt"'),
    ({"prompt": "Q?", "chosen": None, "rejected": "no"}, "malformed fields", r'"chosen" is null'),
    (
        {"prompt": "Q?", "chosen": [{"role": "user", "content": "hi"}], "rejected": "no"},
        "malformed fields",
        "chosen starts with a user turn",
    ),
    (
        {"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]},
        "no shared prompt",
        "share no opening turns",
    ),
    (pair(1, prompt="word " * 200), "no room for the answer", r"the prompt has \d+ tokens .*no room for the answer"),
]


@pytest.mark.parametrize(("row", "reason", "message"), BAD_ROWS, ids=[r[1] + f" {i}" for i, r in enumerate(BAD_ROWS)])
def test_each_bad_row_is_named_by_file_and_line_and_counted(tokenizer, write_jsonl, row, reason, message):
    path = write_jsonl([pair(0), row, pair(2)])
    train, _ = build(tokenizer, path, max_length=64, max_prompt_length=None)
    assert [e["row"] for e in train] == [f"{path}:1", f"{path}:3"]
    s = train.stats
    assert (s.rows_read, s.rows_used, s.dropped) == (3, 2, {reason: 1})
    assert len(s.errors) == 1
    assert s.errors[0].startswith(f"{path}:2: ")
    assert __import__("re").search(message, s.errors[0])
    report = train.report()
    assert f"read 3 rows from {path}" in report and f"dropped 1 (1 {reason})" in report
    assert f"\n  dropped {path}:2: " in report


def test_answers_equal_after_truncation_are_a_bad_row(tokenizer, write_jsonl):
    path = write_jsonl([pair(0), pair(1, chosen="same start " * 40 + "A", rejected="same start " * 40 + "B")])
    train, _ = build(tokenizer, path, max_length=64)
    assert train.stats.dropped == {"chosen same as rejected": 1}
    assert "after truncation to max_length 64" in train.stats.errors[0]


def test_all_rows_bad_raises_listing_the_first_few(tokenizer, write_jsonl):
    path = write_jsonl([pair(i, chosen="x", rejected="x") for i in range(8)])
    with pytest.raises(DataError, match=rf"no usable train pairs in {path}: {path}:1: .*{path}:5: .*\(and 3 more\)"):
        build(tokenizer, path)


def test_bad_rows_fail_makes_any_bad_row_fatal(tokenizer, write_jsonl):
    path = write_jsonl([pair(0), pair(1, chosen="")])
    with pytest.raises(DataError, match=rf"1 train rows make no pair in {path}: {path}:2: "):
        build(tokenizer, path, bad_rows="fail")


def test_eval_from_eval_path_and_from_eval_split(tokenizer, write_jsonl):
    path = write_jsonl([pair(i) for i in range(10)])
    held = write_jsonl([pair(i) for i in range(3)], "eval.jsonl")
    train, eval_set = build_preference_datasets(DataConfig(path=path, eval_path=held), tokenizer)
    assert (len(train), len(eval_set), eval_set.stats.name) == (10, 3, "eval")
    train, eval_set = build_preference_datasets(DataConfig(path=path, eval_split=0.2), tokenizer)
    assert (len(train), len(eval_set)) == (8, 2)
    assert {e["row"] for e in train}.isdisjoint(e["row"] for e in eval_set)


def test_prompt_ends_where_tokens_part_when_a_token_spans_the_boundary(tokenizer, write_jsonl):
    # llama-3's generation prompt ends in "\n\n", which SmolLM2's tokenizer splits differently before "yes"
    path = write_jsonl([pair(0)])
    train, _ = build_preference_datasets(DataConfig(path=path, template="llama-3"), tokenizer)
    (example,) = train
    prompt, chosen, rejected = [{"role": "user", "content": "Question 0?"}], "yes", "no"
    for answer, ids in ((chosen, example["chosen_ids"]), (rejected, example["rejected_ids"])):
        text = render(
            prompt + [{"role": "assistant", "content": answer}], tokenizer, resolve_template(tokenizer, "llama-3")
        )
        assert example["prompt_ids"] + ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    whole = tokenizer(render_prompt(prompt, tokenizer, "llama-3"), add_special_tokens=False)["input_ids"]
    assert len(example["prompt_ids"]) < len(whole) and whole[: len(example["prompt_ids"])] == example["prompt_ids"]
    assert train.stats.shifted == 1
    assert "in 1 pairs the tokenized prompt is not a prefix of the tokenized conversation" in train.report()


def test_template_without_end_of_turn_gets_eos_after_each_answer(tokenizer, write_jsonl):
    bare = copy.copy(tokenizer)
    bare.chat_template = (
        "{%- for m in messages -%}{{- m['role'] + ': ' + m['content'] + '\\n' if m['role'] != 'assistant' "
        "else m['content'] -}}{%- endfor -%}{%- if add_generation_prompt -%}{{- 'assistant: ' -}}{%- endif -%}"
    )
    path = write_jsonl([pair(0), pair(1, chosen="a ", rejected="a")])
    train, _ = build(bare, path)
    assert train[0]["chosen_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(train[0]["chosen_ids"]) == "yes" + tokenizer.eos_token
    # answers differing only in trailing whitespace, which rendering drops, make no pair
    assert train.stats.errors == [
        f"{path}:2: chosen and rejected are the same 2 tokens as rendered; a pair needs two different answers"
    ]


def test_limits_are_checked(tokenizer, write_jsonl):
    path = write_jsonl([pair(0)])
    with pytest.raises(ConfigError, match="truncation_mode is 'left'; choose one of: keep_end, keep_start"):
        build(tokenizer, path, truncation_mode="left")
    with pytest.raises(ConfigError, match="max_prompt_length is 0"):
        build(tokenizer, path, max_prompt_length=0)
    with pytest.raises(ConfigError, match="dataset_format is 'alpaca', a format of SFT rows"):
        check_preference_files(DataConfig(path=path, format="alpaca"))


def test_bundled_pairs_are_clean(tokenizer):
    from pathlib import Path

    import velotune

    root = Path(velotune.__file__).parent / "datasets"
    train, eval_set = build_preference_datasets(
        DataConfig(path=str(root / "iso_dates_pref.jsonl"), eval_path=str(root / "iso_dates_pref_eval.jsonl")),
        tokenizer,
        bad_rows="fail",
    )
    assert len(train) >= 300 and len(eval_set) >= 30
    prompts = {json.dumps(e["prompt_ids"]) for e in train}
    assert prompts.isdisjoint(json.dumps(e["prompt_ids"]) for e in eval_set)


def test_data_inspect_shows_rendered_pairs(tokenizer, write_jsonl, monkeypatch, capsys):
    import argparse

    from velotune.cli import data as data_cmd

    monkeypatch.setattr(data_cmd, "load_tokenizer", lambda model: tokenizer)
    path = write_jsonl([STANDARD, pair(1, chosen="same", rejected="same")])
    parser = argparse.ArgumentParser(prog="velotune")
    data_cmd.add_parser(parser.add_subparsers(dest="command", required=True))
    args, extra = parser.parse_known_args(["data", "inspect", path, "--examples", "1"])
    assert data_cmd.run(args, extra) == 0
    out = capsys.readouterr().out
    assert f"{path}: preference pairs; train on them with --method dpo" in out
    assert "read 2 rows" in out and "used 1 pairs" in out and f"dropped {path}:2: chosen and rejected" in out
    assert f"--- {path}:1\n[prompt: " in out and "<|im_start|>user\nWrite May 3, 2020 as an ISO date.<|im_end|>" in out
    assert "]\n2020-05-03<|im_end|>\n[rejected: " in out
    assert "token lengths of 1 rows" in out


def test_field_map_may_name_the_preference_fields():
    from velotune.data import DataConfig

    cfg = DataConfig(field_map={"good": "chosen", "bad": "rejected", "question": "prompt"})
    assert cfg.field_map["good"] == "chosen"
