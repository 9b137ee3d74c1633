"""Plain-text rows for continued pre-training: every token is a target, no chat template.

The canonical form is one assistant message holding the text; tokenization reads it without a template.
"""

from velotune.data.formats._fields import resolve_fields, text_field

REQUIRED = ("text",)
OPTIONAL: tuple[str, ...] = ()
ALIASES = {"content": "text"}


def to_messages(row: dict, source: str) -> list[dict]:
    """The text of one row, as a single assistant message."""
    row = resolve_fields(row, "text", REQUIRED, OPTIONAL, ALIASES, source)
    return [{"role": "assistant", "content": text_field(row, "text", source)}]
