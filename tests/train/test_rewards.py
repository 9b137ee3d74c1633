"""GRPO reward functions (train/rewards.py): the built-ins score both completion forms TRL passes, specs load by
name, module and file, functions written for TRL work unchanged, and every mistake is one message naming the function
(and the row)."""

import math
import sys

import pytest
import torch

from velotune.errors import ConfigError, RewardError
from velotune.train.rewards import (
    BUILTINS,
    answer_match,
    answer_text,
    columns_read,
    completion_text,
    iso_date,
    last_number,
    length_penalty,
    load_reward_funcs,
    numeric_match,
    reward_names,
    score_completions,
    think_format,
)

HOW = (
    "give a built-in name (think_format, answer_match, numeric_match, length_penalty, iso_date), "
    "package.module:function, path/to/file.py:function, or a function"
)


def conversational(*texts: str) -> list[list[dict]]:
    """Completions as TRL passes them for message prompts."""
    return [[{"role": "assistant", "content": t}] for t in texts]


@pytest.fixture(params=["standard", "conversational"])
def form(request):
    """Either completion form: plain strings (string prompts) or one assistant message each (message prompts)."""
    return (lambda *texts: list(texts)) if request.param == "standard" else conversational


def score(funcs, completions, columns=None, ids=None, max_completion_length=8, prompts=None) -> torch.Tensor:
    n = len(completions)
    return score_completions(
        funcs,
        prompts or ["Q?"] * n,
        completions,
        columns or {},
        ids or [[1, 2]] * n,
        [f"data.jsonl:{i + 1}" for i in range(n)],
        max_completion_length,
    )


def test_completion_text_reads_both_forms():
    assert completion_text("a b") == "a b"
    assert completion_text([{"role": "assistant", "content": "a b"}]) == "a b"
    assert answer_text([{"role": "assistant", "content": "<think>x</think>\n 42 \n"}]) == "42"
    assert answer_text("no think block ") == "no think block"


def test_think_format_wants_one_think_block_then_an_answer(form):
    completions = form(
        "<think>\nreasoning\n</think>\nThe answer is 4.",
        "\n<think></think>4",  # leading whitespace and empty reasoning are fine
        "<think>reasoning</think>   ",  # no answer
        "<think>reasoning without a close. 4",
        "4 <think>late</think> 5",
        "<think>a</think><think>b</think> 4",  # two blocks
        "<think>a <think> b</think> 4",  # nested
        "4",
    )
    assert think_format(completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_answer_match_compares_the_answer_part_ignoring_case_and_spacing(form):
    completions = form("<think>it is paris</think>\n  Paris  ", "The  capital is\nParis", "Lyon", "anything")
    answer = ["paris", "the capital IS paris", "Paris", None]
    assert answer_match(completions, answer=answer) == [1.0, 1.0, 0.0, None]


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("The answer is 1,234.", 1234.0),
        ("It costs $5.50", 5.5),
        ("\\boxed{\\frac{84}{2}} so 42, not \\boxed{42} then 7", 42.0),
        ("from 3-5 it is 5", 5.0),
        ("x = -3", -3.0),
        ("1,2,3", 3.0),
        ("about 1.5e3 grams", 1500.0),
        ("no number", None),
    ],
)
def test_last_number(text, number):
    assert last_number(text) == number


def test_numeric_match_reads_the_last_number_of_the_answer(form):
    completions = form(
        "<think>2 + 2 = 5? no</think> 4",
        "Total: $1,234,567.",
        "so \\boxed{72}.",
        "0.1 + 0.2 = 0.30000000000000004",
        "It is 41.",
        "I cannot say.",
        "7",
    )
    answer = [4, "1234567", "Natalia sold 48/2 = 24 clips... #### 72", 0.3, "42", "3", None]
    assert numeric_match(completions, answer=answer) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, None]


def test_numeric_match_tolerance_is_relative():
    assert numeric_match(["1000000.5"], answer=[1e6]) == [1.0]
    assert numeric_match(["1.00001"], answer=[1]) == [0.0]


def test_length_penalty_is_the_share_of_max_completion_length():
    assert length_penalty(completion_ids=[[], [1, 2], [1] * 8], max_completion_length=8) == [-0.0, -0.25, -1.0]


def test_iso_date_rewards_the_answer_then_any_date(form):
    completions = form(
        "2020-05-03",
        "<think>May is 05</think>\n2020-05-03\n",
        "2020-03-05",
        "2020-13-40",
        "May 3",
        "It is 2020-05-03.",
        "2029-09-22 2049",
    )
    assert iso_date(completions, answer=["2020-05-03"] * 7) == [1.0, 1.0, 0.5, 0.25, 0.0, 0.5, 0.25]


def test_builtins_load_by_name():
    funcs = load_reward_funcs(["iso_date", "think_format"])
    assert funcs == [("iso_date", iso_date), ("think_format", think_format)]
    assert set(BUILTINS) == {"think_format", "answer_match", "numeric_match", "length_penalty", "iso_date"}


def test_functions_load_by_module_path_and_by_file_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def exact(completions, answer, **kwargs):\n    return [1.0] * len(answer)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)
    (name, fn), (builtin, _) = load_reward_funcs(["my_rewards:exact", "velotune.train.rewards:numeric_match"])
    assert (name, builtin) == ("exact", "numeric_match") and fn(completions=["x"], answer=["y"]) == [1.0]

    other = tmp_path / "sub" / "rewards file.py"
    other.parent.mkdir()
    other.write_text(
        "import math\n\ndef half(completions, **kwargs):\n    return [math.sqrt(0.25)] * len(completions)\n"
    )
    ((name, fn),) = load_reward_funcs([f"{other}:half"])
    assert name == "half" and fn(completions=["a", "b"]) == [0.5, 0.5]
    assert reward_names([fn, answer_match]) == ["half", "answer_match"]


def test_bad_specs_name_the_spec_and_what_is_wrong(tmp_path):
    file = tmp_path / "r.py"
    file.write_text(
        "LIMIT = 3\n\ndef good(completions, **kwargs):\n    return []\n\ndef strict(completions):\n    pass\n"
    )
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_package_xyz\n")
    cases = {
        "exact_match": f"unknown reward function 'exact_match'; {HOW}",
        "no_such_module_xyz:f": (
            "reward function 'no_such_module_xyz:f': module 'no_such_module_xyz' not found (not installed, or not "
            f"on the Python path); for a file, give its path (path/to/no_such_module_xyz.py:function); {HOW}"
        ),
        "velotune.train.rewards:nope": (
            "reward function 'velotune.train.rewards:nope': velotune.train.rewards has no attribute 'nope' (its "
            "functions: answer_match, answer_text, columns_read, completion_text, iso_date, last_number, "
            f"length_penalty, load_reward_funcs, numeric_match, reward_name); {HOW}"
        ),
        f"{file}:nope": (
            f"reward function '{file}:nope': {file} has no attribute 'nope' (its functions: good, strict); {HOW}"
        ),
        f"{file}:LIMIT": f"reward function '{file}:LIMIT': LIMIT is a int, not callable; {HOW}",
        f"{tmp_path}/missing.py:f": (
            f"reward function '{tmp_path}/missing.py:f': file {tmp_path}/missing.py not found; {HOW}"
        ),
        f"{broken}:f": (
            f"reward function '{broken}:f': importing {broken} raised ModuleNotFoundError: No module named "
            "'no_such_package_xyz'"
        ),
        f"{file}:strict": (
            f"reward function 'strict' ({file}:strict) takes (completions) and no **kwargs; it is called with the "
            "keywords prompts, completions, completion_ids, max_completion_length and every dataset column, so add "
            "**kwargs to its parameters"
        ),
    }
    for spec, message in cases.items():
        with pytest.raises(ConfigError) as caught:
            load_reward_funcs([spec])
        assert str(caught.value) == message
    with pytest.raises(ConfigError, match=r"^reward function 3 is a int; give a built-in name"):
        load_reward_funcs([3])
    with pytest.raises(ConfigError, match=r"^no reward functions are set; GRPO needs at least one: give a built-in"):
        load_reward_funcs([])
    with pytest.raises(ConfigError) as caught:
        load_reward_funcs(["iso_date", f"{file}:good", "velotune.train.rewards:iso_date"])
    assert str(caught.value) == (
        "two reward functions are named 'iso_date' (iso_date and velotune.train.rewards:iso_date); each is logged as "
        "rewards/<name>/mean, so list a function once and give different functions different names"
    )


def test_score_completions_is_n_by_functions_and_none_is_nan():
    def maybe(completions, **kwargs):
        return [None if c == "skip" else 2.0 for c in completions]

    funcs = load_reward_funcs(["answer_match", maybe, "length_penalty"])
    scores = score(
        funcs, ["a", "skip", "c"], {"answer": ["a", "b", None]}, ids=[[1], [1, 2], []], max_completion_length=4
    )
    assert scores.dtype == torch.float32 and scores.shape == (3, 3)
    expected = torch.tensor([[1.0, 2.0, -0.25], [0.0, math.nan, -0.5], [math.nan, 2.0, 0.0]])
    assert torch.equal(scores.isnan(), expected.isnan())
    assert torch.equal(scores.nan_to_num(), expected.nan_to_num())


def test_a_reward_function_written_for_trl_works_unchanged():
    trl_rewards = pytest.importorskip("trl.rewards")

    def format_reward(completions, **kwargs):  # TRL's documentation example, conversational completions
        return [1.0 if c[0]["content"].startswith("<think>") else 0.0 for c in completions]

    def accuracy(prompts, completions, answer, **kwargs):
        return [
            float(p[-1]["content"].endswith("?") and c[0]["content"] == a)
            for p, c, a in zip(prompts, completions, answer, strict=True)
        ]

    funcs = load_reward_funcs([format_reward, accuracy, trl_rewards.think_format_reward])
    assert reward_names([f for _, f in funcs]) == ["format_reward", "accuracy", "think_format_reward"]
    prompts = [[{"role": "user", "content": "2+2?"}]] * 2
    completions = conversational("<think>easy</think>4", "5")
    scores = score(funcs, completions, {"answer": ["<think>easy</think>4", "4"]}, prompts=prompts)
    assert scores.tolist() == [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]


def test_columns_read_are_named_parameters_other_than_what_every_call_passes():
    def custom(prompts, completions, answer, difficulty, completion_ids, trainer_state, hint=None, **kwargs):
        return []

    assert columns_read(custom) == ["answer", "difficulty"]
    assert columns_read(answer_match) == ["answer"] and columns_read(think_format) == []
    assert columns_read(length_penalty) == []


def test_a_function_that_raises_is_named_with_its_row():
    def reward(completions, answer, **kwargs):
        return [1.0 / len(a) for a in answer]

    with pytest.raises(RewardError) as caught:
        score([("reward", reward)], ["x", "y"], {"answer": ["7", ""]})
    assert str(caught.value) == (
        "reward function 'reward' raised ZeroDivisionError: float division by zero on row data.jsonl:1 (the first of a "
        "batch of 2 completions); fix the function, or the data it reads"
    )
    with pytest.raises(RewardError, match=r"^reward function 'numeric_match' raised ValueError: answer 'seven' holds"):
        score(load_reward_funcs(["numeric_match"]), ["7"], {"answer": ["seven"]})


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (
            [1.0],
            "reward function 'bad' returned 1 rewards for 2 completions; it must return one per completion (None "
            "where it does not apply)",
        ),
        (
            1.0,
            "reward function 'bad' returned a float; it must return a list of 2 rewards, one per completion (None "
            "where it does not apply)",
        ),
        (
            [1.0, "yes"],
            "reward function 'bad' returned 'yes' (str) for row data.jsonl:2; rewards are numbers, or None "
            "where a function does not apply",
        ),
        (
            [math.nan, 1.0],
            "reward function 'bad' returned nan for row data.jsonl:1; rewards must be finite numbers "
            "(return None where a function does not apply)",
        ),
        (
            [1.0, math.inf],
            "reward function 'bad' returned inf for row data.jsonl:2; rewards must be finite numbers "
            "(return None where a function does not apply)",
        ),
    ],
    ids=["count", "not-a-list", "not-a-number", "nan", "inf"],
)
def test_a_wrong_return_value_is_named(returned, message):
    def bad(completions, **kwargs):
        return returned

    with pytest.raises(RewardError) as caught:
        score([("bad", bad)], ["x", "y"])
    assert str(caught.value) == message


def test_tensors_and_numpy_values_are_accepted():
    np = pytest.importorskip("numpy")
    funcs = [("t", lambda **kw: torch.tensor([0.5, 1.0])), ("a", lambda **kw: [np.float32(0.25), torch.tensor(2.0)])]
    assert score(funcs, ["x", "y"]).tolist() == [[0.5, 0.25], [1.0, 2.0]]
