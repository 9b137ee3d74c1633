"""Why a dataset has nothing to train on: the first row without target tokens, rendered as the model sees it.

The data package drops rows whose labels are all masked and raises DataError when every row is dropped; its report
names the rows. A user fixes such data faster from one example with the masked parts marked, so before training
stops, this renders the first such row with the same functions the data package tokenizes with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from velotune.data import DataConfig, detect_format
from velotune.data.dataset import tokenize_row
from velotune.data.formats import FORMATS, apply_field_map
from velotune.data.inspection import show_example
from velotune.data.masking import IGNORE
from velotune.data.readers import read_rows
from velotune.data.templates import resolve_template
from velotune.errors import DataError

ROWS_SCANNED = 200
SHOWN_CHARS = 1500


def first_untrainable(cfg: DataConfig, tokenizer: Any) -> tuple[str, dict, bool] | None:
    """(row name, example, truncated) of the first of the first ROWS_SCANNED rows without a target token left
    after truncation to max_seq_length; None when there is none or the file cannot be read here."""
    if cfg.path is None or not Path(cfg.path).is_file():
        return None
    try:
        for n, (source, row) in enumerate(read_rows(cfg.path)):
            if n >= ROWS_SCANNED:
                return None
            row = apply_field_map(row, cfg.field_map)
            fmt = cfg.format if cfg.format != "auto" else detect_format(row, source)
            template = resolve_template(tokenizer, cfg.template) if FORMATS[fmt].chat else None
            ids, labels = tokenize_row(row, fmt, tokenizer, template, cfg, source)
            if len(ids) > cfg.max_seq_length and cfg.too_long != "truncate":
                continue  # dropped for its length, not for its labels
            kept = labels[: cfg.max_seq_length]
            if ids and all(label == IGNORE for label in kept):
                cut = len(ids) > cfg.max_seq_length
                return source, {"input_ids": ids[: cfg.max_seq_length], "labels": kept}, cut
    except DataError:
        return None
    return None


def explain_untrainable(cfg: DataConfig, tokenizer: Any) -> str:
    """Text to append to the data error: the rendered example and what to change ("" when nothing to show)."""
    found = first_untrainable(cfg, tokenizer)
    if found is None:
        return ""
    source, example, cut = found
    text = show_example(example, tokenizer)
    if len(text) > SHOWN_CHARS:
        text = text[:SHOWN_CHARS] + " ..."
    n = len(example["input_ids"])
    if cut:
        why = (
            f"its first {n} tokens (max_seq_length {cfg.max_seq_length}) are all prompt, so truncation cut away "
            f"every target; raise max_seq_length, or shorten the prompts"
        )
    elif cfg.train_on == "responses":
        why = (
            "train_on: responses trains on assistant turns only, and this row has none the template marks; give "
            "rows an assistant answer (the last turn), or set train_on: all to train on every token"
        )
    else:
        why = "no token of it is a target"
    return f"\n\n{source} as the model sees it ([masked]...[/masked] carries no loss):\n{text}\n{why}"
