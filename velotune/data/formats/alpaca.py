"""Alpaca rows: instruction, optional input, output, optional system -> one user turn and one assistant turn."""

from velotune.data.formats._fields import resolve_fields, text_field

REQUIRED = ("instruction", "output")
OPTIONAL = ("input", "system")
ALIASES: dict[str, str] = {}


def to_messages(row: dict, source: str) -> list[dict]:
    """The conversation for one alpaca row; a non-empty input follows the instruction after a blank line."""
    row = resolve_fields(row, "alpaca", REQUIRED, OPTIONAL, ALIASES, source)
    instruction = text_field(row, "instruction", source)
    extra = text_field(row, "input", source, required=False)
    user = f"{instruction}\n\n{extra}" if extra else instruction
    messages = []
    system = text_field(row, "system", source, required=False)
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": user})
    messages.append({"role": "assistant", "content": text_field(row, "output", source)})
    return messages
