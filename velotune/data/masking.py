"""Tokenize one conversation or text into input_ids and labels, masking everything the model should not learn.

Pure functions of (row content, tokenizer, template): tokenizing a row depends on nothing else, so rows can later be
tokenized in parallel and cached. Labels are aligned with input_ids (the model shifts them); IGNORE marks masked
tokens.

Assistant spans are found on the rendered text, not on tokens: the conversation up to turn i rendered with the
generation prompt ends where turn i's content starts; rendered through turn i it ends after the turn's closing
marker. Everything the model must generate after the generation prompt is a target, up to and including the
closing marker (whitespace after it is not). Tokens whose characters overlap a span (the tokenizer's offset mapping)
are targets.
"""

from collections.abc import Callable

from velotune.data.templates import render
from velotune.errors import DataError

IGNORE = -100


def tokenize_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of `text` (no special tokens added) and each token's character span."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as e:
        raise DataError(
            f"tokenizer {type(tokenizer).__name__} cannot map tokens to characters (a 'slow' Python tokenizer); "
            f"load a fast one (AutoTokenizer.from_pretrained(..., use_fast=True))"
        ) from e
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _trim_end(text: str, start: int, end: int) -> tuple[int, int]:
    """Drop whitespace after the closing marker (e.g. the newline after <|im_end|>): generation stops before it."""
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _rewritten(source: str) -> DataError:
    return DataError(
        f"{source}: the chat template changes assistant text when rendering it (for example it drops <think> "
        f"blocks from earlier turns), so the target tokens cannot be found; set chat_template to a built-in template"
    )


def _turn_end(full: str, start: int, through: str, content: str, source: str) -> int:
    """End of the assistant turn starting at `start` when history renders differently from the final turn.

    The closing marker is what the template writes after the content when the turn is last; the turn ends at its
    first occurrence after `start`.
    """
    at = through.rfind(content) if content else -1
    closer = through[at + len(content) :].strip() if at >= 0 else ""
    if closer:
        found = full.find(closer, start)
        if found >= 0:
            return found + len(closer)
    elif content and full.startswith(content, start):
        return start + len(content)
    raise _rewritten(source)


RenderFn = Callable[[list[dict], bool, str], str]  # (messages, add_generation_prompt, source) -> text


def find_assistant_spans(messages: list[dict], render_fn: RenderFn, full: str, source: str) -> list[tuple[int, int]]:
    """Character spans of `full` (the rendered conversation) holding each assistant turn and its closing marker.

    Templates that render earlier turns differently from the last one (e.g. dropping <think> blocks from history)
    are handled by locating the turn's start or closing marker in `full` instead. The last turn rendered through is
    `full` itself, so a one-turn conversation costs one extra rendering.
    """
    spans, cursor = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_fn(messages[:i], True, source)
        through = full if i == len(messages) - 1 else render_fn(messages[: i + 1], False, source)
        if full.startswith(before) and len(before) >= cursor:
            start = len(before)
        else:
            needle = message["content"].strip()
            start = full.find(needle, cursor) if needle else -1
            if start < 0:
                raise _rewritten(source)
        if full.startswith(through) and len(through) > start:
            end = len(through)
        else:
            end = _turn_end(full, start, through, message["content"], source)
        start, end = _trim_end(full, start, end)
        if end > start:
            spans.append((start, end))
        cursor = max(cursor, end)
    return spans


def assistant_spans(
    messages: list[dict], tokenizer, chat_template: str, full: str, source: str = "conversation"
) -> list[tuple[int, int]]:
    """Character spans of `full` (the rendered conversation) holding each assistant turn and its closing marker."""

    def render_fn(part: list[dict], add_generation_prompt: bool, where: str) -> str:
        return render(part, tokenizer, chat_template, add_generation_prompt=add_generation_prompt, source=where)

    return find_assistant_spans(messages, render_fn, full, source)


def labels_from_spans(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Labels keeping the tokens whose characters overlap a span (sorted, disjoint), IGNORE elsewhere."""
    labels = [IGNORE] * len(ids)
    k = 0
    for t, (s, e) in enumerate(offsets):
        while k < len(spans) and spans[k][1] <= s:
            k += 1
        if k == len(spans):
            break
        a, b = spans[k]
        if (s < b and e > a) or (s == e and a <= s < b):
            labels[t] = ids[t]
    return labels


def tokenize_conversation(
    messages: list[dict], tokenizer, chat_template: str, *, train_on: str = "responses", source: str = "conversation"
) -> tuple[list[int], list[int]]:
    """input_ids and labels for a conversation; with train_on="responses" only assistant turns are targets."""
    full = render(messages, tokenizer, chat_template, source=source)
    ids, offsets = tokenize_with_offsets(tokenizer, full)
    if train_on == "all":
        return ids, list(ids)
    spans = assistant_spans(messages, tokenizer, chat_template, full, source)
    return ids, labels_from_spans(ids, offsets, spans)


def tokenize_text(text: str, tokenizer) -> tuple[list[int], list[int]]:
    """input_ids and labels for plain text: the tokenizer's own BOS if it adds one, the text, then EOS; all targets."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids, list(ids)


def _overlaps(encoding, t: int, a: int, b: int) -> bool:
    s, e = encoding.token_to_chars(t)
    return (s < b and e > a) or (s == e and a <= s < b)


def target_ranges(encoding, spans: list[tuple[int, int]], probes: int = 8) -> list[tuple[int, int]] | None:
    """Token ranges [t0, t1) of a tokenizers Encoding whose characters overlap each span; the labelling of
    `labels_from_spans` without building every token's offsets (which costs more than tokenizing short rows).

    Token offsets never decrease, so the tokens overlapping a span are contiguous: find one token inside the span
    from each end (characters trimmed from offsets, e.g. spaces, belong to no token, so a few are probed), then widen
    while the neighbours still overlap (tokens sharing one character, zero-width tokens). Returns None when no
    token is found within `probes` characters, for the caller to label from the full offsets instead.
    """
    n = len(encoding)
    ranges = []
    for a, b in spans:
        first = last = None
        for c in range(a, min(b, a + probes)):
            first = encoding.char_to_token(c)
            if first is not None:
                break
        for c in range(b - 1, max(a, b - probes) - 1, -1):
            last = encoding.char_to_token(c)
            if last is not None:
                break
        if first is None or last is None or last < first:
            return None
        while first > 0 and _overlaps(encoding, first - 1, a, b):
            first -= 1
        while last + 1 < n and _overlaps(encoding, last + 1, a, b):
            last += 1
        if ranges and first <= ranges[-1][1]:  # two spans sharing a token
            ranges[-1] = (ranges[-1][0], max(ranges[-1][1], last + 1))
        else:
            ranges.append((first, last + 1))
    return ranges
