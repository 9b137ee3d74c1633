"""ShareGPT rows: conversations = [{from: human|gpt|system, value}], any number of turns."""

from velotune.data.formats._fields import resolve_fields
from velotune.data.formats._turns import normalise_turns

REQUIRED = ("conversations",)
OPTIONAL: tuple[str, ...] = ()
ALIASES: dict[str, str] = {}


def to_messages(row: dict, source: str) -> list[dict]:
    """The conversation for one ShareGPT row, roles mapped to system/user/assistant."""
    row = resolve_fields(row, "sharegpt", REQUIRED, OPTIONAL, ALIASES, source)
    return normalise_turns(row["conversations"], "conversations", source)
