"""Reward functions for GRPO, called the way TRL's GRPOTrainer calls them, so that functions written for TRL work
unchanged.

A reward function is called with keyword arguments only: `prompts` (each a string, or a list of {role, content}
messages), `completions` (a string each for string prompts, `[{"role": "assistant", "content": text}]` each for
message prompts), `completion_ids` (token id lists), `max_completion_length`, and every other dataset column as a
list (`answer=[...]`). It returns one float per completion, or None where it does not apply (scored NaN, so that
completion is left out of that function's mean). Functions take **kwargs and ignore what they do not read.

A spec names a function: a callable, a built-in name (BUILTINS), "package.module:function" or
"path/to/file.py:function".
"""

import datetime
import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import torch

from velotune.errors import ConfigError, RewardError

RewardFunc = Callable[..., Sequence[float | None]]

# Keywords every call may carry besides the dataset's columns (the last four are TRL's trainer's), so a parameter
# with one of these names reads no column.
PASSED = (
    "prompts",
    "completions",
    "completion_ids",
    "max_completion_length",
    "trainer_state",
    "log_extra",
    "log_metric",
    "environments",
)

BUILTINS: dict[str, RewardFunc] = {}


def _builtin(fn: RewardFunc) -> RewardFunc:
    BUILTINS[fn.__name__] = fn
    return fn


def completion_text(completion: str | list[dict] | dict) -> str:
    """The text of a completion in either form TRL passes: a string, or a list of messages (contents joined)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, list) and all(isinstance(m, dict) for m in completion):
        return "".join(str(m.get("content") or "") for m in completion)
    raise TypeError(f"a completion is a string or a list of messages, found {type(completion).__name__}")


def answer_text(completion: str | list[dict] | dict) -> str:
    """The answer part of a completion, stripped: the text after its last </think>, else all of it."""
    return completion_text(completion).rpartition("</think>")[2].strip()


# One <think> block (no nested or second tag) and what follows it.
THINK = re.compile(r"\s*<think>(?:(?!</?think>).)*</think>((?:(?!</?think>).)*)", re.DOTALL)


@_builtin
def think_format(completions: list, **kwargs) -> list[float]:
    """1.0 for a <think>...</think> block followed by a non-empty answer (DeepSeek-R1's format), else 0.0."""
    matches = (THINK.fullmatch(completion_text(c)) for c in completions)
    return [1.0 if m and m.group(1).strip() else 0.0 for m in matches]


def _normalise(text: str) -> str:
    return " ".join(text.split()).casefold()


@_builtin
def answer_match(completions: list, answer: list, **kwargs) -> list[float | None]:
    """1.0 when the answer part equals the answer column (whitespace and case aside), else 0.0; None where the row
    has no answer."""
    return [
        None if a is None else float(_normalise(answer_text(c)) == _normalise(str(a)))
        for c, a in zip(completions, answer, strict=True)
    ]


# A sign only where it cannot be a hyphen ("3-5" ends in 5); no digit or point just before the number.
NUMBER = re.compile(r"(?:(?<![\w.])-)?(?<![\d.])(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def _boxed(text: str) -> str | None:
    """The contents of the last \\boxed{...}, braces balanced; None when there is none (or it is not closed)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, open_at = 0, start + len("\\boxed")
    for i in range(open_at, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[open_at + 1 : i]
    return None


def last_number(text: str) -> float | None:
    """The last number in text (in its last \\boxed{...} when it has one), reading 1,234 and $5; None if none."""
    boxed = _boxed(text)
    text = THOUSANDS.sub("", (text if boxed is None else boxed).replace("$", ""))
    found = NUMBER.findall(text)
    return float(found[-1]) if found else None


def _target(value: object) -> float | None:
    """The number an answer column holds: a number, or the last number in its text (GSM8K's "... #### 72")."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    number = last_number(str(value))
    if number is None:
        raise ValueError(f"answer {str(value)[:60]!r} holds no number; numeric_match needs a numeric answer column")
    return number


@_builtin
def numeric_match(completions: list, answer: list, **kwargs) -> list[float | None]:
    """1.0 when the answer part's last number equals the answer column's (1e-6 relative), else 0.0; None where the
    row has no answer."""
    scores: list[float | None] = []
    for c, a in zip(completions, answer, strict=True):
        target = _target(a)
        got = None if target is None else last_number(answer_text(c))
        scores.append(None if target is None else float(got is not None and math.isclose(got, target, rel_tol=1e-6)))
    return scores


@_builtin
def length_penalty(completion_ids: list[list[int]], max_completion_length: int, **kwargs) -> list[float]:
    """-(completion tokens / max_completion_length): 0 for an empty completion, -1 for one cut at the limit."""
    return [-len(ids) / max_completion_length for ids in completion_ids]


ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def _is_iso_date(text: str) -> bool:
    try:
        return ISO_DATE.fullmatch(text) is not None and bool(datetime.date.fromisoformat(text))
    except ValueError:  # the shape of a date, but not a day of the calendar (2020-13-40)
        return False


@_builtin
def iso_date(completions: list, answer: list, **kwargs) -> list[float | None]:
    """The bundled date demo's reward, graded so that a group of a small model's samples differs: 1.0 for the answer
    column exactly, 0.5 for the right date among other text or any other lone YYYY-MM-DD date, 0.25 for a reply that
    holds something of the YYYY-MM-DD shape, 0.0 otherwise; None where the row has no answer."""
    scores: list[float | None] = []
    for c, a in zip(completions, answer, strict=True):
        part, want = answer_text(c), None if a is None else str(a).strip()
        if want is None:
            scores.append(None)
        elif part == want:
            scores.append(1.0)
        elif _is_iso_date(part) or want in ISO_DATE.findall(part):
            scores.append(0.5)
        else:
            scores.append(0.25 if ISO_DATE.search(part) else 0.0)
    return scores


HOW = f"give a built-in name ({', '.join(BUILTINS)}), package.module:function, path/to/file.py:function, or a function"


def _import_file(path: str, spec: str) -> ModuleType:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"reward function {spec!r}: file {path} not found; {HOW}")
    # A module name per file, registered so that its functions pickle (to other processes) by reference.
    name = f"_velotune_rewards_{file.stem}_{hashlib.sha1(str(file.resolve()).encode()).hexdigest()[:8]}"
    module_spec = importlib.util.spec_from_file_location(name, file)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"reward function {spec!r}: {path} cannot be imported as Python; {HOW}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # anything the user's file raises at import
        del sys.modules[name]
        raise ConfigError(
            f"reward function {spec!r}: importing {path} raised {type(e).__name__}: {_one_line(e)}"
        ) from e
    return module


def _import_module(name: str, spec: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            raise ConfigError(
                f"reward function {spec!r}: module {name!r} not found (not installed, or not on the Python path); "
                f"for a file, give its path (path/to/{name.replace('.', '/')}.py:function); {HOW}"
            ) from e
        raise ConfigError(f"reward function {spec!r}: importing {name} raised ModuleNotFoundError: {e}") from e
    except Exception as e:  # anything the user's module raises at import
        raise ConfigError(
            f"reward function {spec!r}: importing {name} raised {type(e).__name__}: {_one_line(e)}"
        ) from e


def _resolve(spec: str) -> Callable:
    """The function a string spec names."""
    if spec in BUILTINS:
        return BUILTINS[spec]
    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise ConfigError(f"unknown reward function {spec!r}; {HOW}")
    is_file = where.endswith(".py") or "/" in where or "\\" in where
    module = _import_file(where, spec) if is_file else _import_module(where, spec)
    if not hasattr(module, attr):
        defined = sorted(
            n
            for n, v in vars(module).items()
            if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module.__name__
        )
        listing = f" (its functions: {', '.join(defined[:10]) or 'none'})"
        raise ConfigError(f"reward function {spec!r}: {where} has no attribute {attr!r}{listing}; {HOW}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise ConfigError(f"reward function {spec!r}: {attr} is a {type(fn).__name__}, not callable; {HOW}")
    return fn


def _check_signature(fn: Callable, spec: object) -> None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without signature metadata: called as it is
        return
    if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        raise ConfigError(
            f"reward function {reward_name(fn)!r} ({spec if isinstance(spec, str) else 'a function'}) takes "
            f"({', '.join(sig.parameters)}) and no **kwargs; it is called with the keywords prompts, completions, "
            f"completion_ids, max_completion_length and every dataset column, so add **kwargs to its parameters"
        )


def reward_name(fn: Callable) -> str:
    """The name a reward function's metrics are logged under (TRL's rewards/<name>/mean): its __name__."""
    name = getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", None)  # or a partial's
    return name or type(fn).__name__


def reward_names(funcs: Sequence[Callable | tuple[str, Callable]]) -> list[str]:
    """The names of reward functions (or of load_reward_funcs' (name, function) pairs)."""
    return [f[0] if isinstance(f, tuple) else reward_name(f) for f in funcs]


def load_reward_funcs(specs: Sequence[str | Callable]) -> list[tuple[str, Callable]]:
    """(name, function) for each spec; ConfigError naming the spec when one cannot be loaded or called."""
    if isinstance(specs, str) or callable(specs):
        specs = [specs]
    if not specs:
        raise ConfigError(f"no reward functions are set; GRPO needs at least one: {HOW}")
    funcs, seen = [], {}
    for spec in specs:
        if not isinstance(spec, str) and not callable(spec):
            raise ConfigError(f"reward function {spec!r} is a {type(spec).__name__}; {HOW}")
        fn = _resolve(spec) if isinstance(spec, str) else spec
        _check_signature(fn, spec)
        name = reward_name(fn)
        if name in seen:
            raise ConfigError(
                f"two reward functions are named {name!r} ({seen[name]} and {spec}); each is logged as "
                f"rewards/<name>/mean, so list a function once and give different functions different names"
            )
        seen[name] = spec if isinstance(spec, str) else name
        funcs.append((name, fn))
    return funcs


def columns_read(fn: Callable) -> list[str]:
    """The dataset columns a reward function needs: its named parameters without defaults, other than PASSED."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in named and p.default is p.empty and p.name not in PASSED]


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or "(no message)"


def _values(name: str, out: object, rows: list[str]) -> list[float]:
    """A function's rewards as floats (None -> NaN); RewardError for a wrong count or a value that is no number."""
    n = len(rows)
    if hasattr(out, "tolist"):  # a tensor or an array
        out = out.tolist()
    if not isinstance(out, Sequence) or isinstance(out, str | bytes):
        raise RewardError(
            f"reward function {name!r} returned a {type(out).__name__}; it must return a list of {n} rewards, one "
            f"per completion (None where it does not apply)"
        )
    if len(out) != n:
        raise RewardError(
            f"reward function {name!r} returned {len(out)} rewards for {n} completions; it must return one per "
            f"completion (None where it does not apply)"
        )
    values = []
    for value, row in zip(out, rows, strict=True):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if value is None:
            values.append(math.nan)
        elif not isinstance(value, numbers.Real):
            raise RewardError(
                f"reward function {name!r} returned {str(value)[:60]!r} ({type(value).__name__}) for row {row}; "
                f"rewards are numbers, or None where a function does not apply"
            )
        elif not math.isfinite(value):
            raise RewardError(
                f"reward function {name!r} returned {value} for row {row}; rewards must be finite numbers (return "
                f"None where a function does not apply)"
            )
        else:
            values.append(float(value))
    return values


def score_completions(
    funcs: list[tuple[str, Callable]],
    prompts: list,
    completions: list,
    columns: dict[str, list],
    completion_ids: list[list[int]],
    rows: list[str],
    max_completion_length: int,
    **extra: object,
) -> torch.Tensor:
    """Rewards [N, num_funcs] float32 of N completions under each function (NaN where one returned None).

    rows[i] ('file:line') names completion i's dataset row in errors; `extra` keywords (e.g. trainer_state) are
    passed to every function as they are.
    """
    n = len(completions)
    assert len(prompts) == len(completion_ids) == len(rows) == n, "one prompt, id list and row per completion"
    assert all(len(v) == n for v in columns.values()), "every column has one value per completion"
    kwargs = {
        **columns,
        **extra,
        "prompts": prompts,
        "completions": completions,
        "completion_ids": completion_ids,
        "max_completion_length": max_completion_length,
    }
    scores = torch.empty(n, len(funcs), dtype=torch.float32)  # [N, num_funcs]
    if n == 0:
        return scores
    for j, (name, fn) in enumerate(funcs):
        try:
            out = fn(**kwargs)
        except Exception as e:  # the user's function: re-raised naming it and the batch
            raise RewardError(
                f"reward function {name!r} raised {type(e).__name__}: {_one_line(e)} on row {rows[0]} (the first "
                f"of a batch of {n} completions); fix the function, or the data it reads"
            ) from e
        scores[:, j] = torch.tensor(_values(name, out, rows), dtype=torch.float32)
    return scores
