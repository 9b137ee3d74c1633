"""Prompt datasets for GRPO: rows of a prompt (text, or a list of {role, content} messages) and any other columns
(an answer, a difficulty, ...) that reward functions read, tokenized into examples
{"prompt_ids", "prompt", "columns", "row"}.

Tokens, as TRL's GRPOTrainer makes them: a message list is rendered with the chat template and its generation
prompt (cfg.system_prompt prepended when the messages have no system message) and tokenized without special tokens;
a text prompt is tokenized as it is, with the tokenizer's own special tokens (its BOS, for tokenizers that add one).
Prompts longer than max_prompt_length keep their last max_prompt_length tokens (TRL cuts on the left, so the end
of the prompt stays next to the completion); the report counts them.

`prompt` is what reward functions receive as prompts: the text, or the messages as rendered (role/content, with the
system prompt). `columns` holds the row's other fields, after field_map, under their names.

Rows without a usable prompt (missing, empty, neither text nor messages, messages the template cannot render) are
named "file:line: what is wrong" and counted; when no row is usable, DataError lists the first few
(bad_rows="fail" makes any one fatal).
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from velotune.data import hf_datasets
from velotune.data.config import DataConfig
from velotune.data.dataset import split_indices
from velotune.data.formats import CANONICAL_FIELDS, apply_field_map
from velotune.data.formats._turns import normalise_turns
from velotune.data.preference import BAD_ROWS, BadRow, RowCounts, encode_rows, first_row  # encode_rows: .encode
from velotune.data.rendering import Renderer
from velotune.data.sources import open_source
from velotune.data.templates import resolve_template, with_system_prompt
from velotune.errors import ConfigError, DataError

# Reasons a row gives no prompt, as the report counts them.
MISSING, EMPTY, MALFORMED = "missing prompt", "empty prompt", "malformed prompt"
# Fields a prompt often sits in under another name, suggested for field_map.
LIKELY_PROMPTS = ("question", "instruction", "problem", "query", "input", "text", "messages")


def _rename_hint(row: dict) -> str:
    name = next((k for k in LIKELY_PROMPTS if k in row), None)
    name = name or next((k for k, v in row.items() if isinstance(v, str | list)), "your_field")
    return f"field_map: {{{name}: prompt}}"


def to_prompt(
    row: dict, source: str, field_map: dict[str, str] | None = None, system_prompt: str | None = None
) -> str | list[dict]:
    """The prompt of one row: its text, or its messages as role/content turns (system_prompt prepended when they
    have no system message); BadRow when it has no usable prompt."""
    fields = apply_field_map(row, field_map or {})
    if "prompt" not in fields:
        raise BadRow(
            MISSING,
            f"{source}: no prompt field (this row has: {', '.join(map(str, row)) or 'no fields'}); GRPO rows need a "
            f"prompt, text or a list of {{role, content}} messages; rename your field with {_rename_hint(row)}",
        )
    value = fields["prompt"]
    if isinstance(value, str):
        if not value.strip():
            raise BadRow(EMPTY, f'{source}: "prompt" is empty; a prompt needs text for the model to answer')
        return value
    if isinstance(value, list):
        try:
            turns = normalise_turns(value, "prompt", source)
        except DataError as e:
            raise BadRow(EMPTY if not value else MALFORMED, str(e)) from e
        if not any(t["content"].strip() for t in turns):
            raise BadRow(EMPTY, f'{source}: "prompt" has only empty messages; a prompt needs text for the model')
        return with_system_prompt(turns, system_prompt)
    found = "null" if value is None else type(value).__name__
    raise BadRow(MALFORMED, f'{source}: "prompt" is {found}; expected text or a list of {{role, content}} messages')


@dataclass
class Outcome:
    """One row read: its prompt and columns, then its tokens, or why it makes no example."""

    row: str
    prompt: str | list[dict] | None = None
    columns: dict = field(default_factory=dict)
    ids: list[int] | None = None
    reason: str = ""
    message: str = ""
    truncated: bool = False


class PromptEncoder:
    """Renders and tokenizes prompts under one tokenizer, template and max_prompt_length."""

    def __init__(self, tokenizer, cfg: DataConfig, max_prompt_length: int | None) -> None:
        self.tokenizer, self.cfg, self.max_prompt_length = tokenizer, cfg, max_prompt_length
        self._renderer: Renderer | None = None  # made at the first message prompt: text prompts need no template

    def renderer(self) -> Renderer:
        """The chat template's renderer; DataError (a setting to change, not a bad row) when there is no template."""
        if self._renderer is None:
            self._renderer = Renderer(self.tokenizer, resolve_template(self.tokenizer, self.cfg.template))
        return self._renderer

    def encode(self, rows: list[tuple[str, dict]]) -> list[Outcome]:
        """Outcomes of a chunk of (source, row): rendered one by one, tokenized in one batch per prompt kind."""
        outcomes, chat, rendered, plain = [], [], [], []
        for source, row in rows:
            out = Outcome(source)
            outcomes.append(out)
            try:
                out.prompt = to_prompt(row, source, self.cfg.field_map, self.cfg.system_prompt)
            except BadRow as e:
                out.reason, out.message = e.reason, str(e)
                continue
            out.columns = {k: v for k, v in apply_field_map(row, self.cfg.field_map).items() if k != "prompt"}
            if isinstance(out.prompt, str):
                plain.append(out)
                continue
            render = self.renderer()
            try:
                rendered.append(render(out.prompt, True, source))
                chat.append(out)
            except DataError as e:  # the template cannot render these messages
                out.reason, out.message = MALFORMED, str(e)
        batches = ((chat, rendered, False), (plain, [o.prompt for o in plain], True))
        for outs, texts, special in batches:
            ids = self.tokenizer(texts, add_special_tokens=special)["input_ids"] if texts else []
            for out, token_ids in zip(outs, ids, strict=True):
                self._fit(out, token_ids)
        return outcomes

    def _fit(self, out: Outcome, ids: list[int]) -> None:
        if not ids:
            out.reason, out.message = EMPTY, f"{out.row}: the prompt tokenizes to no tokens"
            return
        limit = self.max_prompt_length
        if limit is not None and len(ids) > limit:
            ids, out.truncated = ids[-limit:], True
        out.ids = ids


@dataclass
class PromptStats(RowCounts):
    """What happened to every row read: a prompt used, or dropped (with the reason), and its tokens."""

    max_prompt_length: int | None = None
    kinds: dict[str, int] = field(default_factory=dict)  # "text" or "messages" -> prompts used
    truncated: int = 0
    prompt_tokens: int = 0
    max_tokens: int = 0
    columns: dict[str, int] = field(default_factory=dict)  # extra column -> prompts used that have it

    def add(self, out: Outcome) -> None:
        """Count one row read."""
        self.count(out.ids is not None, out.reason, out.message)
        if out.ids is None:
            return
        kind = "text" if isinstance(out.prompt, str) else "messages"
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        self.truncated += out.truncated
        self.prompt_tokens += len(out.ids)
        self.max_tokens = max(self.max_tokens, len(out.ids))
        for name in out.columns:
            self.columns[name] = self.columns.get(name, 0) + 1


class PromptDataset(Sequence[dict]):
    """Prompts {"prompt_ids", "prompt", "columns", "row"} with the stats of how they were made."""

    def __init__(self, examples: list[dict], stats: PromptStats) -> None:
        self.examples = examples  # prompt_ids held as int32 arrays (a Python int list costs ~9x the memory)
        self.stats = stats

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int | slice) -> dict | list[dict]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        e = self.examples[index]
        return {
            "prompt_ids": e["prompt_ids"].tolist(),
            "prompt": e["prompt"],
            "columns": dict(e["columns"]),
            "row": e["row"],
        }

    def __iter__(self) -> Iterator[dict]:
        return (self[i] for i in range(len(self)))

    @property
    def columns(self) -> set[str]:
        """Names of the extra columns (those of any row), which reward functions receive as keyword arguments."""
        return set(self.stats.columns)

    @property
    def lengths(self) -> list[int]:
        """Tokens of each prompt."""
        return [len(e["prompt_ids"]) for e in self.examples]

    def report(self) -> str:
        """A summary: rows read, prompts used, rows dropped (how many and why), tokens, truncation and the extra
        columns; then the first dropped rows' messages, one a line."""
        s = self.stats
        kinds = ", ".join(f"{kind} {n:,}" for kind, n in s.kinds.items())
        parts = [f"{s.name}: read {s.rows_read:,} rows from {s.source} ({kinds}), used {s.rows_used:,} prompts"]
        if s.dropped:
            reasons = ", ".join(f"{n:,} {reason}" for reason, n in sorted(s.dropped.items(), key=lambda kv: -kv[1]))
            parts.append(f"dropped {s.rows_dropped:,} ({reasons})")
        else:
            parts.append("dropped none")
        parts.append(f"prompt tokens mean {s.prompt_tokens / max(s.rows_used, 1):,.1f}, max {s.max_tokens:,}")
        if s.truncated:
            parts.append(f"truncated {s.truncated:,} to their last max_prompt_length {s.max_prompt_length:,} tokens")
        columns = [name if n == s.rows_used else f"{name} (in {n:,} rows)" for name, n in s.columns.items()]
        parts.append(f"columns: {', '.join(columns) or 'none besides prompt'}")
        text = ", ".join(parts[:2]) + "; " + "; ".join(parts[2:]) + "."
        shown = "".join(f"\n  dropped {message}" for message in s.errors)
        more = f"\n  ... and {s.rows_dropped - len(s.errors):,} more" if s.rows_dropped > len(s.errors) else ""
        return text + shown + more


def make_dataset(
    outcomes: list[Outcome], name: str, source: str, encoder: PromptEncoder, bad_rows: str
) -> PromptDataset:
    """The dataset of the prompts among `outcomes`, with their stats; DataError when none is usable (or, with
    bad_rows="fail", when any row is bad)."""
    stats = PromptStats(name=name, source=source, max_prompt_length=encoder.max_prompt_length)
    for out in outcomes:
        stats.add(out)
    examples = [
        {"prompt_ids": np.asarray(o.ids, dtype=np.int32), "prompt": o.prompt, "columns": o.columns, "row": o.row}
        for o in outcomes
        if o.ids is not None
    ]
    if not stats.rows_used or (bad_rows == "fail" and stats.rows_dropped):
        what = (
            f"no usable {name} prompts"
            if not stats.rows_used
            else f"{stats.rows_dropped:,} {name} rows have no usable prompt"
        )
        more = (
            f" (and {stats.rows_dropped - len(stats.errors):,} more)" if stats.rows_dropped > len(stats.errors) else ""
        )
        raise DataError(f"{what} in {source}: {'; '.join(stats.errors) or 'the data has no rows'}{more}")
    return PromptDataset(examples, stats)


def _check_settings(cfg: DataConfig, max_prompt_length: int | None, bad_rows: str) -> None:
    if cfg.format != "auto":
        raise ConfigError(
            f"dataset_format is {cfg.format!r}, a format of SFT rows; GRPO reads a prompt field (and any columns "
            f"your reward functions use); remove dataset_format, and rename fields with field_map if needed"
        )
    if bad_rows not in BAD_ROWS:
        raise ConfigError(f"bad_rows is {bad_rows!r}; choose one of: {', '.join(BAD_ROWS)}")
    value = max_prompt_length
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"max_prompt_length is {value!r}; expected a whole number >= 1 (or unset)")


def build_prompt_datasets(
    cfg: DataConfig, tokenizer, max_prompt_length: int | None, *, bad_rows: str = "drop"
) -> tuple[PromptDataset, PromptDataset | None]:
    """Read and tokenize GRPO prompts: (train, eval), eval from cfg.eval_path or cfg.eval_split.

    Prompts over max_prompt_length keep their last tokens. Rows without a usable prompt are dropped and reported
    (bad_rows="fail": raise instead). Not cached on disk: prompts tokenize in one batched pass.
    """
    if cfg.path is None:
        raise ConfigError("no dataset is set; set dataset to a .jsonl, .json, .csv or .parquet file of prompts")
    _check_settings(cfg, max_prompt_length, bad_rows)
    encoder = PromptEncoder(tokenizer, cfg, max_prompt_length)
    train = encode_rows(open_source(cfg.path, cfg.split).rows(), encoder)
    if cfg.eval_path is not None:
        held = encode_rows(open_source(cfg.eval_path, None, for_eval=True).rows(), encoder)
        eval_set = make_dataset(held, "eval", cfg.eval_path, encoder, bad_rows)
        return make_dataset(train, "train", cfg.path, encoder, bad_rows), eval_set
    if cfg.eval_split > 0:
        kept, held = split_indices(len(train), cfg.eval_split, cfg.seed)
        where = f"{cfg.path}, held out by eval_split {cfg.eval_split}"
        eval_set = make_dataset([train[i] for i in held], "eval", where, encoder, bad_rows)
        return make_dataset([train[i] for i in kept], "train", cfg.path, encoder, bad_rows), eval_set
    return make_dataset(train, "train", cfg.path, encoder, bad_rows), None


def check_prompt_file(path: str, field_map: dict[str, str] | None = None, split: str | None = None) -> None:
    """Read the first row of a data file and raise DataError in milliseconds, before a model loads, when the file
    is missing, empty or malformed or its row has no usable prompt. A hub dataset is left to training to read."""
    if hf_datasets.looks_like_hub_name(path):
        return
    first = first_row(path, split)
    if first is None:
        raise DataError(f"{path}: no rows found; the file is empty (or holds only blank lines)")
    to_prompt(first[1], first[0], field_map)


def check_prompt_files(cfg: DataConfig) -> None:
    """check_prompt_file on the training data and the eval data."""
    if cfg.path is not None:
        check_prompt_file(cfg.path, cfg.field_map, cfg.split)
    if cfg.eval_path is not None:
        check_prompt_file(cfg.eval_path, cfg.field_map)


def require_columns(dataset: PromptDataset, needed: dict[str, list[str]]) -> None:
    """DataError when a reward function reads a column (needed: function name -> columns, e.g. from
    velotune.train.rewards.columns_read) that the dataset lacks, or that some of its rows lack."""
    source, have = dataset.stats.source, dataset.stats.columns
    for name, columns in needed.items():
        for column in columns:
            if column not in have:
                fix = (
                    f"add it to the data, or map your column onto it with field_map: {{your_column: {column}}}"
                    if column in CANONICAL_FIELDS
                    else "add it to the data"
                )
                raise DataError(
                    f"reward function {name} reads column {column!r}, which {source} does not have (its columns: "
                    f"{', '.join(sorted(have)) or 'none besides prompt'}); {fix}, or leave the function out"
                )
            if have[column] < len(dataset):
                first = next(e["row"] for e in dataset.examples if column not in e["columns"])
                raise DataError(
                    f"reward function {name} reads column {column!r}, which {len(dataset) - have[column]:,} of "
                    f"{len(dataset):,} rows of {source} lack (first: {first}); give every row {column!r}"
                )
