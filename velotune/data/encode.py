"""Tokenize rows a chunk at a time into flat token arrays, with the same result as tokenizing them one by one.

Per chunk: Python converts and renders every row (`prepare`), the Rust tokenizer encodes the chunk's texts on all
cores (`encode_texts`, which releases the GIL, so the next chunk can be prepared meanwhile), then Python turns the
encodings into arrays (`assemble`). `tokenize_row` in dataset.py is the one-row reference this must agree with;
tokenizers without a Rust backend ("slow" ones) go through it row by row.
"""

import os
from dataclasses import dataclass, field

import numpy as np

from velotune.data.config import DataConfig
from velotune.data.formats import FORMATS, apply_field_map, to_messages
from velotune.data.masking import (
    find_assistant_spans,
    labels_from_spans,
    target_ranges,
    tokenize_text,
    tokenize_with_offsets,
)
from velotune.data.rendering import Renderer
from velotune.data.templates import resolve_template, with_system_prompt
from velotune.errors import DataError

PREFIX_CHECKS = 64  # rows whose split tokenization is compared with tokenizing the whole text

# Status of a row read: used, or the reason it was dropped.
USED, EMPTY, TOO_LONG, NO_TARGETS, NO_TARGETS_TRUNCATED = range(5)


def drop_reason(code: int, max_seq_length: int) -> str:
    """The reason a report gives for rows with status `code`."""
    return {
        EMPTY: "empty after tokenization",
        TOO_LONG: f"longer than max_seq_length {max_seq_length:,}",
        NO_TARGETS: "no target tokens",
        NO_TARGETS_TRUNCATED: "no target tokens after truncation",
    }[code]


def too_long_error(source: str, n: int, max_seq_length: int) -> DataError:
    return DataError(
        f"{source}: {n:,} tokens, longer than max_seq_length {max_seq_length:,}; raise "
        f"max_seq_length, or set too_long to truncate or drop"
    )


@dataclass
class Encoded:
    """A chunk of rows read, tokenized: per-row status and counts, and the kept tokens of the used rows."""

    sources: list[str]  # row names, "file:line"
    status: np.ndarray  # [R] int8: USED or a drop reason
    length: np.ndarray  # [R] int32: tokens before truncation
    kept: np.ndarray  # [R] int32: tokens kept (0 for dropped rows)
    targets: np.ndarray  # [R] int32: target tokens among those kept
    ids: np.ndarray  # [N] kept tokens of the used rows, concatenated
    mask: np.ndarray  # [N] uint8: 1 where the token is a target (its label is its id)


@dataclass
class Prepared:
    """A chunk converted and rendered, waiting for the tokenizer."""

    sources: list[str]
    texts: list[str]
    spans: list[list[tuple[int, int]] | None]  # assistant character spans; None: every token is a target
    error: Exception | None  # raised after the rows before it, so the first error in file order wins


@dataclass
class Encodings:
    """The tokenizer's output for a Prepared chunk: per text, the encoding of text[cut:], after `prefix_ids`."""

    items: list  # tokenizers.Encoding per text (None: tokenize with the one-row reference)
    cut: int = 0  # characters of the shared prefix
    prefix_ids: list[int] = field(default_factory=list)  # its tokens


def backend_of(tokenizer):
    """The Rust tokenizer behind a transformers fast tokenizer, or None for a slow one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend if backend is not None and hasattr(backend, "encode_batch") else None


class RowEncoder:
    """Tokenizes rows of one format with one tokenizer and DataConfig; picklable, so worker processes can run it."""

    def __init__(self, tokenizer, fmt: str, cfg: DataConfig, id_dtype: np.dtype) -> None:
        self.tokenizer, self.fmt, self.cfg, self.id_dtype = tokenizer, fmt, cfg, np.dtype(id_dtype)
        self.chat = FORMATS[fmt].chat
        self.chat_template = resolve_template(tokenizer, cfg.template) if self.chat else None
        self.renderer = Renderer(tokenizer, self.chat_template) if self.chat else None
        self.eos = getattr(tokenizer, "eos_token_id", None)
        backend = backend_of(tokenizer)
        if backend is not None and (backend.truncation is not None or backend.padding is not None):
            # A caller's last call left truncation or padding set on it: use a copy without them.
            from tokenizers import Tokenizer

            backend = Tokenizer.from_str(backend.to_str())
            backend.no_truncation()
            backend.no_padding()
        self.backend = backend
        # Added tokens that split text cleanly: what precedes one is tokenized independently of what follows it.
        added = backend.get_added_tokens_decoder().values() if backend is not None and self.chat else ()
        self.boundaries = tuple(
            t.content for t in added if not (t.lstrip or t.rstrip or t.single_word or t.normalized) and t.content
        )
        self.prefix_checks = PREFIX_CHECKS
        self.prefix_ids: dict[str, list[int]] = {}

    def encode(self, rows: list[tuple[str, dict]], error: Exception | None = None) -> Encoded:
        """Tokenize a chunk of (source, row) in one go (what a worker process runs); `error` is raised after the
        rows (the reader's, when it failed after them)."""
        prepared = self.prepare(rows, error)
        return self.assemble(prepared, self.encode_texts(prepared))

    def prepare(self, rows: list[tuple[str, dict]], error: Exception | None = None) -> Prepared:
        """Convert and render each row; the first row that fails ends the chunk, its error kept for later (else
        `error`, the reader's)."""
        sources, texts, spans = [], [], []
        for source, row in rows:
            try:
                text, row_spans = self._render(apply_field_map(row, self.cfg.field_map), source)
            except DataError as e:
                error = e
                break
            sources.append(source)
            texts.append(text)
            spans.append(row_spans)
        return Prepared(sources, texts, spans, error)

    def _render(self, row: dict, source: str) -> tuple[str, list[tuple[int, int]] | None]:
        messages = to_messages(row, self.fmt, source)
        if not self.chat:
            return messages[0]["content"], None
        messages = with_system_prompt(messages, self.cfg.system_prompt)
        renderer = self.renderer
        full = renderer(messages, False, source)
        if self.cfg.train_on == "all":
            return full, None
        return full, find_assistant_spans(messages, renderer, full, source)

    def _shared_prefix(self, prepared: Prepared) -> int:
        """Characters that every text of the chunk starts with, up to the end of an added token that splits text
        cleanly, and before any target span: those are tokenized once for the chunk instead of once per row (chat
        templates put the same system prompt in every row)."""
        if not self.boundaries or len(prepared.texts) < 2:
            return 0
        prefix = os.path.commonprefix(prepared.texts)
        limit = min([len(prefix)] + [spans[0][0] for spans in prepared.spans if spans])
        cut = 0
        for token in self.boundaries:
            at = prefix.rfind(token, 0, limit)
            if at >= 0 and at + len(token) <= limit:
                cut = max(cut, at + len(token))
        return cut

    def encode_texts(self, prepared: Prepared) -> Encodings:
        """Every text tokenized: Rust batch encoding (all cores, GIL released) if possible, shared prefix once."""
        if self.backend is None:
            return Encodings([None] * len(prepared.texts))
        if not self.chat:
            return Encodings(self.backend.encode_batch(prepared.texts, add_special_tokens=True))
        texts, cut = prepared.texts, self._shared_prefix(prepared)
        if not cut:
            return Encodings(self.backend.encode_batch(texts, add_special_tokens=False))
        prefix = texts[0][:cut]
        if prefix not in self.prefix_ids:
            self.prefix_ids[prefix] = self.backend.encode(prefix, add_special_tokens=False).ids
        prefix_ids = self.prefix_ids[prefix]
        items = self.backend.encode_batch([t[cut:] for t in texts], add_special_tokens=False)
        if self.prefix_checks > 0:  # the split must not change a token: check against tokenizing whole texts
            checked = min(self.prefix_checks, len(texts))
            self.prefix_checks -= checked
            whole = self.backend.encode_batch(texts[:checked], add_special_tokens=False)
            if any(w.ids != prefix_ids + e.ids for w, e in zip(whole, items, strict=False)):
                self.boundaries = ()
                return Encodings(self.backend.encode_batch(texts, add_special_tokens=False))
        return Encodings(items, cut, prefix_ids)

    def _ids_and_ranges(self, text: str, spans, encoding, cut: int, prefix_ids: list[int]):
        """(input ids, target token ranges) of one text from its encoding (of text[cut:], after prefix_ids)."""
        if encoding is None:  # slow tokenizer: the one-row reference path, which says what it cannot do
            return self._reference(text, spans)
        ids = prefix_ids + encoding.ids if cut else encoding.ids
        if not self.chat:
            if self.eos is not None and (not ids or ids[-1] != self.eos):
                ids.append(self.eos)
            return ids, [(0, len(ids))]
        if spans is None:
            return ids, [(0, len(ids))]
        if cut:
            spans = [(a - cut, b - cut) for a, b in spans]
        ranges = target_ranges(encoding, spans)
        if ranges is None:
            ranges = _runs(labels_from_spans(encoding.ids, [tuple(o) for o in encoding.offsets], spans))
        if cut:
            ranges = [(t0 + len(prefix_ids), t1 + len(prefix_ids)) for t0, t1 in ranges]
        return ids, ranges

    def _reference(self, text: str, spans) -> tuple[list[int], list[tuple[int, int]]]:
        if not self.chat:
            ids, _ = tokenize_text(text, self.tokenizer)
            return ids, [(0, len(ids))]
        ids, offsets = tokenize_with_offsets(self.tokenizer, text)
        if spans is None:
            return ids, [(0, len(ids))]
        return ids, _runs(labels_from_spans(ids, offsets, spans))

    def assemble(self, prepared: Prepared, encodings: Encodings) -> Encoded:
        """Apply the length policy to every row and pack the kept tokens into arrays; raises the chunk's error."""
        cfg, limit = self.cfg, self.cfg.max_seq_length
        n_rows = len(prepared.sources)
        status = np.zeros(n_rows, dtype=np.int8)
        length = np.zeros(n_rows, dtype=np.int32)
        kept = np.zeros(n_rows, dtype=np.int32)
        targets = np.zeros(n_rows, dtype=np.int32)
        flat: list[int] = []
        starts: list[int] = []  # target ranges in `flat`
        ends: list[int] = []
        cut, prefix_ids = encodings.cut, encodings.prefix_ids
        for r, (source, text, spans, encoding) in enumerate(
            zip(prepared.sources, prepared.texts, prepared.spans, encodings.items, strict=True)
        ):
            ids, ranges = self._ids_and_ranges(text, spans, encoding, cut, prefix_ids)
            n = length[r] = len(ids)
            if n == 0:
                status[r] = EMPTY
                continue
            if n > limit and cfg.too_long == "drop":
                status[r] = TOO_LONG
                continue
            if n > limit and cfg.too_long == "fail":
                raise too_long_error(source, n, limit)
            keep = min(n, limit)
            count = sum(max(0, min(t1, keep) - t0) for t0, t1 in ranges)
            if count == 0:
                status[r] = NO_TARGETS_TRUNCATED if keep < n else NO_TARGETS
                continue
            base = len(flat)
            flat.extend(ids[:keep] if keep < n else ids)
            for t0, t1 in ranges:
                if t0 < keep:
                    starts.append(base + t0)
                    ends.append(base + min(t1, keep))
            kept[r], targets[r] = keep, count
        if prepared.error is not None:
            raise prepared.error
        ids_array = np.array(flat, dtype=self.id_dtype)
        marks = np.zeros(len(flat) + 1, dtype=np.int32)
        np.add.at(marks, np.array(starts, dtype=np.int64), 1)
        np.add.at(marks, np.array(ends, dtype=np.int64), -1)
        mask = (np.cumsum(marks[:-1]) > 0).astype(np.uint8)
        return Encoded(prepared.sources, status, length, kept, targets, ids_array, mask)


def _runs(labels: list[int]) -> list[tuple[int, int]]:
    """Ranges [t0, t1) of consecutive unmasked labels."""
    ranges, start = [], None
    for t, label in enumerate(labels):
        if label != -100 and start is None:
            start = t
        elif label == -100 and start is not None:
            ranges.append((start, t))
            start = None
    if start is not None:
        ranges.append((start, len(labels)))
    return ranges
