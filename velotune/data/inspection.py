"""Look at a dataset before training on it: format, rows used and dropped, token lengths, and what is masked."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from velotune.data.config import DataConfig
from velotune.data.dataset import TokenizedDataset, dataset_from_store, tokenize_path
from velotune.data.encode import EMPTY
from velotune.data.masking import IGNORE

MASK_OPEN, MASK_CLOSE = "[masked]", "[/masked]"
DIM, RESET = "\x1b[2m", "\x1b[0m"


@dataclass
class Inspection:
    """A tokenized dataset file and the token length of every row that tokenized (before truncation)."""

    dataset: TokenizedDataset  # every row of the file (no eval split)
    lengths: np.ndarray  # [n] tokens per row before truncation, rows that tokenized to something
    max_seq_length: int

    @property
    def over(self) -> int:
        """Rows longer than max_seq_length (truncated or dropped, as data.too_long says)."""
        return int((self.lengths > self.max_seq_length).sum())

    def rows_over(self, limit: int = 3) -> list[str]:
        """Names of the first rows longer than max_seq_length."""
        store = self.dataset.store
        assert store is not None
        rows = np.flatnonzero(np.asarray(store.length) > self.max_seq_length)[:limit]
        return [store.name(int(r)) for r in rows]


def inspect_data(cfg: DataConfig, tokenizer, progress: bool = False) -> Inspection:
    """Tokenize the file at cfg.path (cached like training data) and gather what `velotune data inspect` shows."""
    assert cfg.path is not None
    tokenized = tokenize_path(cfg.path, cfg, tokenizer, "data", progress)
    dataset = dataset_from_store(tokenized, None, "data", cfg.path, cfg)
    store = tokenized.store
    lengths = np.asarray(store.length)[np.asarray(store.status) != EMPTY]
    return Inspection(dataset, lengths, cfg.max_seq_length)


def histogram(lengths: np.ndarray, bins: int = 12) -> list[tuple[int, int, int]]:
    """(low, high, rows) per bin of equal width covering min(lengths)..max(lengths); high exclusive."""
    lengths = np.asarray(lengths, dtype=np.int64)
    low, top = (int(lengths.min()), int(lengths.max()) + 1) if len(lengths) else (0, 1)
    width = max(1, -(-(top - low) // bins))
    counts = np.bincount((lengths - low) // width, minlength=-(-(top - low) // width))
    return [(low + k * width, low + (k + 1) * width, int(c)) for k, c in enumerate(counts)]


def histogram_text(lengths: np.ndarray, max_seq_length: int, bins: int = 12, bar: int = 40) -> str:
    """The token-length histogram as lines of text, with where max_seq_length falls."""
    if not len(lengths):
        return "token lengths: no rows tokenized"
    p50, p95 = np.percentile(lengths, [50, 95])
    lines = [
        f"token lengths of {len(lengths):,} rows: min {lengths.min():,}, median {p50:,.0f}, 95th percentile "
        f"{p95:,.0f}, max {lengths.max():,} (max_seq_length {max_seq_length:,})"
    ]
    table = histogram(lengths, bins)
    most = max(c for _, _, c in table) or 1
    digits = len(f"{table[-1][1]:,}")
    for low, high, count in table:
        if low > max_seq_length:
            marker = "  over max_seq_length"
        elif high - 1 > max_seq_length:
            marker = "  <- max_seq_length"
        else:
            marker = ""
        bar_text = "#" * round(bar * count / most)
        lines.append(f"  {low:>{digits},} - {high - 1:>{digits},} | {bar_text:<{bar}} {count:,}{marker}")
    return "\n".join(lines)


def histogram_figure(lengths: np.ndarray, max_seq_length: int, title: str = ""):
    """The histogram as a matplotlib figure whose x axis spans the data (min to max length), so short rows are not
    squeezed into a sliver of a max_seq_length-wide axis; max_seq_length is marked where it falls inside it."""
    from matplotlib.figure import Figure  # not pyplot: no global backend or figure registry

    lengths = np.asarray(lengths)
    low, high = (int(lengths.min()), int(lengths.max())) if len(lengths) else (0, 1)
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    bins = np.arange(low, high + 2) - 0.5 if high - low < 60 else 60  # few lengths: one bar each
    ax.hist(lengths, bins=bins, color="#4c72b0")
    margin = max(1.0, 0.03 * (high - low))
    ax.set_xlim(max(0.0, low - margin), high + margin)
    label = "tokens per row (before truncation)"
    if max_seq_length <= high + margin:
        ax.axvline(max_seq_length, color="#c44e52", linestyle="--", label=f"max_seq_length {max_seq_length:,}")
        ax.legend()
    else:
        label += f"; max_seq_length {max_seq_length:,} is beyond the longest row"
    ax.set_xlabel(label)
    ax.set_ylabel("rows")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def histogram_png(lengths: np.ndarray, max_seq_length: int, out: Path, title: str = "") -> str:
    """Draw the histogram to `out` with matplotlib; returns a line saying where, or why there is no picture."""
    try:
        fig = histogram_figure(lengths, max_seq_length, title)
    except ImportError:
        return "no PNG histogram: matplotlib is not installed (pip install matplotlib)"
    try:
        fig.savefig(out, dpi=100)
    except OSError as e:
        return f"no PNG histogram: cannot write {out} ({e.strerror or e}); give another path with --output"
    return f"histogram written to {out}"


def show_example(example: dict, tokenizer, color: bool = False) -> str:
    """An example decoded, its masked (non-target) text dimmed (color) or wrapped in [masked]...[/masked]."""
    ids, labels = example["input_ids"], example["labels"]
    pieces, start = [], 0
    for t in range(1, len(ids) + 1):
        if t == len(ids) or (labels[t] == IGNORE) != (labels[start] == IGNORE):
            text = tokenizer.decode(ids[start:t], skip_special_tokens=False)
            if labels[start] == IGNORE:
                text = f"{DIM}{text}{RESET}" if color else f"{MASK_OPEN}{text}{MASK_CLOSE}"
            pieces.append(text)
            start = t
    return "".join(pieces)
