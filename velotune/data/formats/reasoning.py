"""Reasoning rows: question, chain of thought, answer -> assistant content "<think>\\n{cot}\\n</think>\\n\\n{answer}".

Common field spellings are read as the canonical names, e.g. medical-o1's Question / Complex_CoT / Response.
"""

from velotune.data.formats._fields import resolve_fields, text_field

REQUIRED = ("question", "thinking", "answer")
OPTIONAL = ("system",)
ALIASES = {
    "problem": "question",
    "complex_cot": "thinking",
    "cot": "thinking",
    "chain_of_thought": "thinking",
    "reasoning": "thinking",
    "thoughts": "thinking",
    "response": "answer",
    "solution": "answer",
}


def to_messages(row: dict, source: str) -> list[dict]:
    """The conversation for one reasoning row; the thinking and the answer are stripped of outer whitespace."""
    row = resolve_fields(row, "reasoning", REQUIRED, OPTIONAL, ALIASES, source)
    thinking = text_field(row, "thinking", source).strip()
    answer = text_field(row, "answer", source).strip()
    messages = []
    system = text_field(row, "system", source, required=False)
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": text_field(row, "question", source)})
    messages.append({"role": "assistant", "content": f"<think>\n{thinking}\n</think>\n\n{answer}"})
    return messages
