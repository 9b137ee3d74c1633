"""Dataset row formats: each turns one row into the canonical conversation [{"role", "content"}].

One module per format; `FORMATS` maps the name users write in `dataset_format:` to it. Auto-detection tries the
formats in `DETECTION_ORDER` and picks the first whose required fields the row has.
"""

from collections.abc import Callable
from dataclasses import dataclass

from velotune.data.formats import alpaca, messages, prompt_completion, reasoning, sharegpt, text
from velotune.errors import DataError


@dataclass(frozen=True)
class Format:
    """A row format: the fields it reads and how it builds a conversation."""

    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...]
    aliases: dict[str, str]
    convert: Callable[[dict, str], list[dict]]
    chat: bool = True  # False: plain text, tokenized without a chat template


def _format(name: str, module, chat: bool = True) -> Format:
    return Format(name, module.REQUIRED, module.OPTIONAL, module.ALIASES, module.to_messages, chat)


FORMATS: dict[str, Format] = {
    "alpaca": _format("alpaca", alpaca),
    "sharegpt": _format("sharegpt", sharegpt),
    "messages": _format("messages", messages),
    "prompt_completion": _format("prompt_completion", prompt_completion),
    "text": _format("text", text, chat=False),
    "reasoning": _format("reasoning", reasoning),
}

# Most specific first: a reasoning row may also carry a "text" column, a chat row may carry anything.
DETECTION_ORDER = ("sharegpt", "messages", "alpaca", "prompt_completion", "reasoning", "text")

PREFERENCE_FIELDS = ("prompt", "chosen", "rejected", "system")  # data/preference.py reads these
CANONICAL_FIELDS = sorted(
    {f for spec in FORMATS.values() for f in spec.required + spec.optional} | set(PREFERENCE_FIELDS)
)


def apply_field_map(row: dict, field_map: dict[str, str]) -> dict:
    """Rename the user's fields to canonical names (field_map: user name -> canonical name)."""
    if not field_map:
        return row
    return {field_map.get(key, key): value for key, value in row.items()}


def _has_fields(row: dict, spec: Format) -> bool:
    lookup = {**spec.aliases, **{name: name for name in spec.required + spec.optional}}
    found = {lookup.get(k.lower(), k) for k in row if isinstance(k, str)}
    return all(name in found for name in spec.required)


def detect_format(row: dict, source: str = "row") -> str:
    """Name the format of a row from its fields (apply field_map first); raise DataError if none fits."""
    for name in DETECTION_ORDER:
        if _has_fields(row, FORMATS[name]):
            return name
    expected = "; ".join(f"{n} ({', '.join(FORMATS[n].required)})" for n in DETECTION_ORDER)
    raise DataError(
        f"{source}: cannot tell the data format from the fields ({', '.join(map(str, row)) or 'none'}); "
        f"expected one of: {expected}. Set dataset_format: <name>, or rename fields with field_map"
    )


def to_messages(row: dict, fmt: str, source: str) -> list[dict]:
    """The canonical conversation [{"role": system|user|assistant, "content": str}] of one row in format `fmt`."""
    if not isinstance(row, dict):
        raise DataError(f"{source}: expected an object with named fields, found {type(row).__name__}")
    if fmt == "auto":
        fmt = detect_format(row, source)
    spec = FORMATS.get(fmt)
    if spec is None:
        raise DataError(f"unknown data format {fmt!r}; expected one of: auto, {', '.join(FORMATS)}")
    return spec.convert(row, source)
