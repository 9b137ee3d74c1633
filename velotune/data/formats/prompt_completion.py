"""Prompt/completion rows: the prompt is the user turn, the completion the assistant turn.

Either field may also be a list of role/content turns (TRL's conversational prompt-completion layout).
"""

from velotune.data.formats._fields import resolve_fields, text_field
from velotune.data.formats._turns import normalise_turns

REQUIRED = ("prompt", "completion")
OPTIONAL = ("system",)
ALIASES: dict[str, str] = {}


def to_messages(row: dict, source: str) -> list[dict]:
    """The conversation for one prompt/completion row."""
    row = resolve_fields(row, "prompt_completion", REQUIRED, OPTIONAL, ALIASES, source)
    messages = []
    system = text_field(row, "system", source, required=False)
    if system:
        messages.append({"role": "system", "content": system})
    if isinstance(row["prompt"], list):
        messages += normalise_turns(row["prompt"], "prompt", source)
    else:
        messages.append({"role": "user", "content": text_field(row, "prompt", source)})
    if isinstance(row["completion"], list):
        messages += normalise_turns(row["completion"], "completion", source)
    else:
        messages.append({"role": "assistant", "content": text_field(row, "completion", source)})
    return messages
