"""Build tokenized train/eval datasets from DataConfig, accounting for every row read."""

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from velotune.data.config import DataConfig
from velotune.data.formats import FORMATS, apply_field_map, detect_format, to_messages
from velotune.data.masking import IGNORE, tokenize_conversation, tokenize_text
from velotune.data.readers import read_rows
from velotune.data.templates import resolve_template, with_system_prompt
from velotune.errors import ConfigError, DataError

EXAMPLES_PER_REASON = 3  # row names kept per drop reason, so a report can point at them


@dataclass
class DataStats:
    """What happened to every row read: used or dropped (with the reason), and the tokens that came out."""

    name: str = "train"
    source: str = ""
    format: str = ""
    max_seq_length: int = 0
    rows_read: int = 0
    rows_used: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> rows
    dropped_rows: dict[str, list[str]] = field(default_factory=dict)  # reason -> first few "file:line"
    truncated: int = 0
    tokens: int = 0
    target_tokens: int = 0

    def drop(self, reason: str, row: str) -> None:
        """Count a dropped row under `reason`."""
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        kept = self.dropped_rows.setdefault(reason, [])
        if len(kept) < EXAMPLES_PER_REASON:
            kept.append(row)

    @property
    def rows_dropped(self) -> int:
        """Rows dropped for any reason."""
        return sum(self.dropped.values())


class TokenizedDataset(Sequence[dict]):
    """Tokenized examples {"input_ids", "labels", "row"} with the stats of how they were made."""

    def __init__(self, examples: list[dict], stats: DataStats) -> None:
        self.examples = examples
        self.stats = stats

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int | slice) -> dict | list[dict]:
        return self.examples[index]

    def __iter__(self) -> Iterator[dict]:
        return iter(self.examples)

    @property
    def lengths(self) -> list[int]:
        """Token count of every example (for packing and length-grouped batching)."""
        return [len(e["input_ids"]) for e in self.examples]

    def report(self) -> str:
        """A one-paragraph summary: rows read, used and dropped (and why), truncation, token counts."""
        s = self.stats
        parts = [f"{s.name}: read {s.rows_read:,} rows from {s.source} (format {s.format}), used {s.rows_used:,}"]
        if s.dropped:
            reasons = "; ".join(
                f"{n:,} {reason} (e.g. {', '.join(s.dropped_rows.get(reason, []))})"
                for reason, n in sorted(s.dropped.items(), key=lambda kv: -kv[1])
            )
            parts.append(f"dropped {s.rows_dropped:,}: {reasons}")
        else:
            parts.append("dropped none")
        if s.truncated:
            parts.append(f"truncated {s.truncated:,} to max_seq_length {s.max_seq_length:,} tokens")
        share = f" ({100 * s.target_tokens / s.tokens:.1f}%)" if s.tokens else ""
        parts.append(f"{s.tokens:,} tokens, {s.target_tokens:,} of them targets{share}")
        return ", ".join(parts[:2]) + "; " + "; ".join(parts[2:]) + "."


def fit_length(
    ids: list[int], labels: list[int], max_seq_length: int, too_long: str, source: str
) -> tuple[list[int], list[int], bool]:
    """Apply the too_long policy; returns (ids, labels, truncated). Raises on too_long="fail"; drop is the caller's."""
    if len(ids) <= max_seq_length:
        return ids, labels, False
    if too_long == "fail":
        raise DataError(
            f"{source}: {len(ids):,} tokens, longer than max_seq_length {max_seq_length:,}; raise "
            f"data.max_seq_length, or set data.too_long to truncate or drop"
        )
    return ids[:max_seq_length], labels[:max_seq_length], True


def tokenize_row(
    row: dict, fmt: str, tokenizer, chat_template: str | None, cfg: DataConfig, source: str
) -> tuple[list[int], list[int]]:
    """input_ids and labels for one row (field_map already applied); a pure function of its arguments."""
    messages = to_messages(row, fmt, source)
    if not FORMATS[fmt].chat:
        return tokenize_text(messages[0]["content"], tokenizer)
    assert chat_template is not None
    messages = with_system_prompt(messages, cfg.system_prompt)
    return tokenize_conversation(messages, tokenizer, chat_template, train_on=cfg.train_on, source=source)


def _read(path: str, cfg: DataConfig) -> tuple[list[tuple[str, dict]], str]:
    """All rows of a file with field_map applied, and their format (detected from the first row if auto)."""
    rows = [(source, apply_field_map(row, cfg.field_map)) for source, row in read_rows(path)]
    if not rows:
        raise DataError(f"{path}: no rows found; the file is empty (or holds only blank lines)")
    fmt = cfg.format if cfg.format != "auto" else detect_format(rows[0][1], rows[0][0])
    return rows, fmt


def _tokenize(
    name: str, path: str, rows: list[tuple[str, dict]], fmt: str, tokenizer, cfg: DataConfig
) -> TokenizedDataset:
    stats = DataStats(name=name, source=path, format=fmt, max_seq_length=cfg.max_seq_length)
    chat_template = resolve_template(tokenizer, cfg.template) if FORMATS[fmt].chat else None
    examples = []
    for source, row in rows:
        stats.rows_read += 1
        ids, labels = tokenize_row(row, fmt, tokenizer, chat_template, cfg, source)
        if not ids:
            stats.drop("empty after tokenization", source)
            continue
        if len(ids) > cfg.max_seq_length and cfg.too_long == "drop":
            stats.drop(f"longer than max_seq_length {cfg.max_seq_length:,}", source)
            continue
        ids, labels, truncated = fit_length(ids, labels, cfg.max_seq_length, cfg.too_long, source)
        targets = sum(1 for t in labels if t != IGNORE)
        if targets == 0:
            stats.drop("no target tokens" + (" after truncation" if truncated else ""), source)
            continue
        stats.truncated += truncated
        stats.rows_used += 1
        stats.tokens += len(ids)
        stats.target_tokens += targets
        examples.append({"input_ids": ids, "labels": labels, "row": source})
    assert stats.rows_read == stats.rows_used + stats.rows_dropped
    dataset = TokenizedDataset(examples, stats)
    if not examples:
        raise DataError(
            f"no usable {name} rows: {dataset.report()} Raise data.max_seq_length, set data.too_long to truncate, "
            f"or check that rows have assistant turns"
        )
    return dataset


def split_rows(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out round(fraction * n) rows (at least 1), chosen by a seeded shuffle; both parts keep file order."""
    n_eval = max(1, round(fraction * len(rows)))
    if n_eval >= len(rows):
        raise DataError(
            f"eval_split {fraction} of {len(rows)} rows leaves no training rows; lower data.eval_split or add rows"
        )
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def build_datasets(cfg: DataConfig, tokenizer) -> tuple[TokenizedDataset, TokenizedDataset | None]:
    """Read, convert and tokenize the training data (and eval data, from eval_path or eval_split)."""
    if cfg.path is None:
        raise ConfigError("data.path is not set; set it to a .jsonl, .json, .csv or .parquet file")
    rows, fmt = _read(cfg.path, cfg)
    eval_set = None
    if cfg.eval_path is not None:
        eval_rows, eval_fmt = _read(cfg.eval_path, cfg)
        eval_set = _tokenize("eval", cfg.eval_path, eval_rows, eval_fmt, tokenizer, cfg)
    elif cfg.eval_split > 0:
        rows, eval_rows = split_rows(rows, cfg.eval_split, cfg.seed)
        eval_set = _tokenize(
            "eval", f"{cfg.path}, held out by eval_split {cfg.eval_split}", eval_rows, fmt, tokenizer, cfg
        )
    return _tokenize("train", cfg.path, rows, fmt, tokenizer, cfg), eval_set
