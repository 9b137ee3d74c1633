"""Conversation lists shared by the sharegpt and messages formats: normalise turns to role/content dicts."""

from velotune.errors import DataError

# Role names seen in the wild -> canonical role.
ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
}


def _content_text(content: object, source: str, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI-style content parts; only text parts can be trained on
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise DataError(
                    f"{source}: turn {index} has a content part of type {kind!r}; only text parts "
                    f'({{"type": "text", "text": ...}}) are supported'
                )
        return "".join(parts)
    found = "null" if content is None else type(content).__name__
    raise DataError(f"{source}: turn {index} content is {found}; expected text (a string)")


def normalise_turns(turns: object, field_name: str, source: str) -> list[dict]:
    """Turn a list of {from, value} or {role, content} dicts into [{"role", "content"}] with canonical roles."""
    if not isinstance(turns, list) or not turns:
        found = "an empty list" if isinstance(turns, list) else type(turns).__name__
        raise DataError(f'{source}: "{field_name}" is {found}; expected a non-empty list of turns')
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f'{source}: "{field_name}" turn {i} is {type(turn).__name__}; expected an object')
        if "from" in turn or "value" in turn:
            role_key, content_key = "from", "value"
        else:
            role_key, content_key = "role", "content"
        if role_key not in turn or content_key not in turn:
            raise DataError(
                f'{source}: "{field_name}" turn {i} has fields ({", ".join(map(str, turn))}); expected '
                f"role and content (or ShareGPT's from and value)"
            )
        role = ROLES.get(str(turn[role_key]).lower())
        if role is None:
            raise DataError(
                f"{source}: turn {i} has role {turn[role_key]!r}; expected one of: {', '.join(sorted(ROLES))}"
            )
        messages.append({"role": role, "content": _content_text(turn[content_key], source, i)})
    return messages
