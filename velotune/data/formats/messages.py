"""OpenAI-style rows: messages = [{role: system|user|assistant, content}], any number of turns."""

from velotune.data.formats._fields import resolve_fields
from velotune.data.formats._turns import normalise_turns

REQUIRED = ("messages",)
OPTIONAL: tuple[str, ...] = ()
ALIASES: dict[str, str] = {}


def to_messages(row: dict, source: str) -> list[dict]:
    """The conversation for one messages row."""
    row = resolve_fields(row, "messages", REQUIRED, OPTIONAL, ALIASES, source)
    return normalise_turns(row["messages"], "messages", source)
