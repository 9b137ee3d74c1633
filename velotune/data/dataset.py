"""Build tokenized train/eval datasets from DataConfig, accounting for every row read.

The data source is tokenized once into a store on disk (pipeline.py; cached across runs), and the datasets are
views of it: all rows, or the train and held-out parts of an eval_split, each with its own stats.
"""

import random
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from velotune.data.config import DataConfig
from velotune.data.encode import USED, drop_reason, too_long_error
from velotune.data.formats import FORMATS, to_messages
from velotune.data.masking import tokenize_conversation, tokenize_text
from velotune.data.packing import PaddingStats, padding_stats
from velotune.data.pipeline import Tokenized, tokenize_source
from velotune.data.sources import open_source
from velotune.data.store import ExampleArrays, TokenStore
from velotune.data.templates import with_system_prompt
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
    seed: int = 0  # of the batch shuffle the padding figures assume
    seconds: float = 0.0  # tokenizing the source (or loading it from the cache) took
    rows_tokenized: int = 0  # rows of the whole source (before any eval split) those seconds cover
    cache_hit: bool = False
    cache_path: str = ""  # cache entry used or written ("" when not cached)
    cache_note: str = ""  # why the cache was not used, when it was asked for

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

    def provenance(self) -> str:
        """How the tokens were obtained: from the cache, or tokenized at what speed (and cached where)."""
        if self.cache_hit:
            return f"Loaded from cache {self.cache_path} in {self.seconds:.2f} s"
        if not self.seconds:
            return ""
        rate = f" ({self.rows_tokenized / self.seconds:,.0f} rows/s)" if self.seconds > 0 else ""
        where = f"; cached in {self.cache_path}" if self.cache_path else ""
        where += f"; not cached: {self.cache_note}" if self.cache_note else ""
        return f"Tokenized {self.rows_tokenized:,} rows in {self.seconds:.1f} s{rate}{where}"


class TokenizedDataset(Sequence[dict]):
    """Tokenized examples {"input_ids", "labels", "row"} with the stats of how they were made.

    `examples` is a list of dicts, or (from build_datasets) ExampleArrays: token arrays memory-mapped from disk,
    each item built as plain lists when asked for, so a dataset of any size costs little memory.
    """

    def __init__(self, examples: Sequence[dict], stats: DataStats, store: TokenStore | None = None) -> None:
        self.examples = examples
        self.stats = stats
        self.store = store  # every row read from the source, used or not (for inspection)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int | slice) -> dict | list[dict]:
        return self.examples[index]

    def __iter__(self) -> Iterator[dict]:
        return iter(self.examples)

    @property
    def lengths(self) -> list[int]:
        """Token count of every example (for packing and length-grouped batching)."""
        if isinstance(self.examples, ExampleArrays):
            return self.examples.lengths.tolist()
        return [len(e["input_ids"]) for e in self.examples]

    def padding(self, batch_size: int = 8) -> PaddingStats:
        """Padding in shuffled batches of `batch_size`, without and with packing."""
        lengths = self.examples.lengths if isinstance(self.examples, ExampleArrays) else self.lengths
        return padding_stats(lengths, self.stats.max_seq_length, batch_size, self.stats.seed)

    def report(self, batch_size: int = 8) -> str:
        """A summary: rows read, used and dropped (and why), truncation, tokens, padding, and how it was obtained."""
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
        if self.examples and s.max_seq_length:
            parts.append(self.padding(batch_size).describe())
        text = ", ".join(parts[:2]) + "; " + "; ".join(parts[2:]) + "."
        return text + (f" {s.provenance()}." if s.provenance() else "")


def fit_length(
    ids: list[int], labels: list[int], max_seq_length: int, too_long: str, source: str
) -> tuple[list[int], list[int], bool]:
    """Apply the too_long policy; returns (ids, labels, truncated). Raises on too_long="fail"; drop is the caller's."""
    if len(ids) <= max_seq_length:
        return ids, labels, False
    if too_long == "fail":
        raise too_long_error(source, len(ids), max_seq_length)
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


def split_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the train and held-out rows among n: round(fraction * n) rows (at least 1) held out, chosen by a
    seeded shuffle; both in file order."""
    n_eval = max(1, round(fraction * n))
    if n_eval >= n:
        raise DataError(f"eval_split {fraction} of {n} rows leaves no training rows; lower eval_split or add rows")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = np.zeros(n, dtype=bool)
    held[order[:n_eval]] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


def split_rows(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out rows as split_indices chooses them; both parts keep file order."""
    train, held = split_indices(len(rows), fraction, seed)
    return [rows[i] for i in train], [rows[i] for i in held]


def dataset_from_store(tokenized: Tokenized, rows: np.ndarray | None, name: str, source: str, cfg: DataConfig):
    """The dataset of the store's rows at positions `rows` (None: all), with their stats."""
    store = tokenized.store
    rows = np.arange(store.rows_read) if rows is None else rows
    status = np.asarray(store.status[rows])
    used = status == USED
    stats = DataStats(name=name, source=source, format=store.format, max_seq_length=cfg.max_seq_length)
    stats.rows_read, stats.rows_used = len(rows), int(used.sum())
    codes = [int(c) for c in np.unique(status[~used])]
    first_at = {c: int(np.argmax(status == c)) for c in codes}
    for code in sorted(codes, key=first_at.get):  # reasons in the order rows first hit them, as when streaming
        reason = drop_reason(code, cfg.max_seq_length)
        where = rows[status == code]
        stats.dropped[reason] = len(where)
        stats.dropped_rows[reason] = [store.name(int(r)) for r in where[:EXAMPLES_PER_REASON]]
    kept, length = np.asarray(store.kept[rows]), np.asarray(store.length[rows])
    stats.truncated = int((used & (kept < length)).sum())
    stats.tokens = int(kept[used].sum())
    stats.target_tokens = int(np.asarray(store.targets[rows])[used].sum())
    stats.seed = cfg.seed
    stats.seconds, stats.rows_tokenized = tokenized.seconds, store.rows_read
    stats.cache_hit, stats.cache_path, stats.cache_note = (
        tokenized.cache_hit,
        tokenized.cache_path,
        tokenized.cache_note,
    )
    assert stats.rows_read == stats.rows_used + stats.rows_dropped
    # rows -> positions among the store's examples (used rows are the store's examples, in order)
    examples = np.searchsorted(store.used_rows, rows[used])
    dataset = TokenizedDataset(ExampleArrays(store, examples), stats, store)
    if not stats.rows_used:
        raise DataError(
            f"no usable {name} rows: {dataset.report()} Raise max_seq_length, set too_long to truncate, "
            f"or check that rows have assistant turns"
        )
    return dataset


def tokenize_path(
    path: str, cfg: DataConfig, tokenizer, name: str = "train", progress: bool = False, *, for_eval: bool = False
) -> Tokenized:
    """Every row of data at `path` tokenized under `cfg` (from the cache when possible)."""
    source = open_source(path, cfg.split if not for_eval else None, for_eval)
    return tokenize_source(source, cfg, tokenizer, name, progress)


def build_datasets(
    cfg: DataConfig, tokenizer, *, progress: bool | None = None
) -> tuple[TokenizedDataset, TokenizedDataset | None]:
    """Read, convert and tokenize the training data (and eval data, from eval_path or eval_split).

    Tokenized data is cached on disk (data.cache, data.cache_dir), so a second run with the same data, tokenizer
    and settings starts at once. progress: show a progress bar (default: when stderr is a terminal).
    """
    if cfg.path is None:
        raise ConfigError("no dataset is set; set dataset to a .jsonl, .json, .csv or .parquet file")
    progress = sys.stderr.isatty() if progress is None else progress
    train = tokenize_path(cfg.path, cfg, tokenizer, "train", progress)
    eval_set = None
    if cfg.eval_path is not None:
        tokenized = tokenize_path(cfg.eval_path, cfg, tokenizer, "eval", progress, for_eval=True)
        eval_set = dataset_from_store(tokenized, None, "eval", cfg.eval_path, cfg)
    elif cfg.eval_split > 0:
        train_rows, eval_rows = split_indices(train.store.rows_read, cfg.eval_split, cfg.seed)
        held_out = f"{cfg.path}, held out by eval_split {cfg.eval_split}"
        eval_set = dataset_from_store(train, eval_rows, "eval", held_out, cfg)
        return dataset_from_store(train, train_rows, "train", cfg.path, cfg), eval_set
    return dataset_from_store(train, None, "train", cfg.path, cfg), eval_set
