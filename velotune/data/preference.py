"""Preference pairs for DPO / ORPO / SimPO: rows of (prompt, chosen, rejected) rendered with the chat template and
tokenized into examples {"prompt_ids", "chosen_ids", "rejected_ids", "row"}.

Row formats (TRL's), told apart per row by their fields (after field_map; "question" and "instruction" also read
as the prompt, and an optional "system" text becomes the system message):
  standard         prompt, chosen and rejected are text: the prompt is the user turn, each answer the reply.
  conversational   prompt is a list of turns; chosen and rejected are lists of (usually one) assistant turns.
  implicit_prompt  no prompt: chosen and rejected are whole conversations, and the turns they share are the prompt.

Tokens: prompt + answer is rendered as one conversation, up to the answer's end-of-turn marker (whitespace after it
dropped, as the SFT masking does), and tokenized whole; the prompt's tokens are the leading tokens that both
conversations share with the tokenized prompt (the prompt rendered with the generation prompt). So prompt_ids +
chosen_ids is exactly the tokenization of the rendered prompt+chosen conversation, and likewise for rejected. When
the tokenized prompt is not a prefix of that (a token merging across the boundary, or a template that renders the
prompt differently on its own), the prompt ends where they part, as TRL does, and the report counts those pairs.
A template that writes nothing after an assistant turn gets the tokenizer's EOS appended to each answer.

Length (TRL's names): prompts longer than max_prompt_length are cut to it (truncation_mode keep_end keeps their
end, next to the answer; keep_start their start); then if prompt + the longer answer exceeds max_length, the answers
are cut at their end. Both are counted in the report.

Rows that make no usable pair (missing fields, an empty answer, chosen == rejected, a prompt that leaves no room
for the answer) are not trained on: each is named "file:line: reason" and counted in the report; when no row makes
a pair, DataError lists the first few (bad_rows="fail" makes any one fatal).
"""

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from velotune.data import hf_datasets
from velotune.data.config import DataConfig
from velotune.data.dataset import split_indices
from velotune.data.formats import apply_field_map
from velotune.data.formats._turns import normalise_turns
from velotune.data.rendering import Renderer
from velotune.data.sources import open_source
from velotune.data.templates import resolve_template, with_system_prompt
from velotune.errors import ConfigError, DataError

FIELDS = ("prompt", "chosen", "rejected", "system")
ALIASES = {"question": "prompt", "instruction": "prompt"}  # other names preference sets give the prompt
SIDES = ("prompt", "chosen", "rejected")  # an example's token lists, {side}_ids
TRUNCATION_MODES = ("keep_end", "keep_start")
BAD_ROWS = ("drop", "fail")
CHUNK = 1024  # rows rendered, then tokenized in one batch call
SHOWN = 5  # bad-row messages a report or an error lists

# Reasons a row makes no pair, as the report counts them.
MISSING, MALFORMED, EMPTY, SAME, NO_PROMPT, NO_ROOM = (
    "missing fields",
    "malformed fields",
    "empty chosen or rejected",
    "chosen same as rejected",
    "no shared prompt",
    "no room for the answer",
)


class BadRow(DataError):
    """A row that makes no pair; `reason` is the report's category, the message names the row."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _canonical(row: dict) -> dict:
    """The row keyed by preference field names: exact names first, then other cases and ALIASES."""
    out = {k: v for k, v in row.items() if k in FIELDS}
    for key, value in row.items():
        name = key.lower() if isinstance(key, str) else None
        name = ALIASES.get(name, name)
        if name in FIELDS and name not in out:
            out[name] = value
    return out


def detect_preference(row: dict, field_map: dict[str, str] | None = None) -> bool:
    """Whether a row looks like preference data (it has chosen and rejected), e.g. for the CLI to suggest
    --method dpo for it, or sft for a row without them."""
    fields = _canonical(apply_field_map(row, field_map or {}))
    return "chosen" in fields and "rejected" in fields


def _missing(fields: dict, row: dict, source: str) -> BadRow | None:
    absent = [n for n in ("prompt", "chosen", "rejected") if n not in fields]
    if absent == ["prompt"] and isinstance(fields["chosen"], list):
        return None  # implicit prompt: the conversations' shared turns
    if not absent:
        return None
    quoted = " and ".join(f'"{n}"' for n in absent)
    return BadRow(
        MISSING,
        f"{source}: missing {quoted}; preference rows need prompt, chosen and rejected (or chosen and rejected "
        f"conversations sharing their opening turns) (this row has: {', '.join(map(str, row)) or 'no fields'}); "
        f"rename your fields with field_map, e.g. field_map: {{your_name: {absent[0]}}}",
    )


def row_format(row: dict, source: str, field_map: dict[str, str] | None = None) -> str:
    """The preference format of one row: standard, conversational or implicit_prompt; BadRow if fields are missing."""
    fields = _canonical(apply_field_map(row, field_map or {}))
    bad = _missing(fields, row, source)
    if bad is not None:
        raise bad
    if "prompt" not in fields:
        return "implicit_prompt"
    return "conversational" if isinstance(fields["prompt"], list) else "standard"


def _turns(value: object, name: str, role: str, source: str) -> list[dict]:
    """Text as one turn of `role`, or a list of turns normalised to role/content."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value:
        try:
            return normalise_turns(value, name, source)
        except DataError as e:
            raise BadRow(MALFORMED, str(e)) from e
    found = "an empty list" if isinstance(value, list) else "null" if value is None else type(value).__name__
    reason = EMPTY if isinstance(value, list) else MALFORMED
    raise BadRow(reason, f'{source}: "{name}" is {found}; expected text or a non-empty list of turns')


def _explicit(fields: dict, source: str) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen, rejected) turns of a standard or conversational row."""
    prompt = _turns(fields["prompt"], "prompt", "user", source)
    chosen = _turns(fields["chosen"], "chosen", "assistant", source)
    return prompt, chosen, _turns(fields["rejected"], "rejected", "assistant", source)


def _implicit(fields: dict, source: str) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen, rejected) turns of two conversations: the prompt is the turns both open with."""
    chosen = _turns(fields["chosen"], "chosen", "assistant", source)
    rejected = _turns(fields["rejected"], "rejected", "assistant", source)
    if chosen == rejected:
        raise BadRow(SAME, f"{source}: chosen and rejected are the same conversation; a pair needs two answers")
    shared = next((i for i, (c, r) in enumerate(zip(chosen, rejected, strict=False)) if c != r), None)
    shared = min(len(chosen), len(rejected)) if shared is None else shared
    if shared == 0:
        raise BadRow(
            NO_PROMPT,
            f"{source}: chosen and rejected share no opening turns, so there is no prompt; start both with the same "
            f"user turn, or give the prompt in a prompt field",
        )
    return chosen[:shared], chosen[shared:], rejected[shared:]


PAIR_FORMATS = {"standard": _explicit, "conversational": _explicit, "implicit_prompt": _implicit}


def _check_answer(turns: list[dict], name: str, source: str) -> None:
    if not turns:
        raise BadRow(EMPTY, f"{source}: {name} has no turns after the prompt; it needs the assistant's answer")
    if turns[0]["role"] != "assistant":
        raise BadRow(
            MALFORMED, f"{source}: {name} starts with a {turns[0]['role']} turn; the answer must be the assistant's"
        )
    if not any(t["content"].strip() for t in turns):
        raise BadRow(EMPTY, f'{source}: "{name}" is empty; a pair needs two non-empty answers')


def to_pair(
    row: dict, source: str, field_map: dict[str, str] | None = None, system_prompt: str | None = None
) -> tuple[str, list[dict], list[dict], list[dict]]:
    """(format, prompt turns, chosen turns, rejected turns) of one row; BadRow when it makes no pair."""
    fmt = row_format(row, source, field_map)
    fields = _canonical(apply_field_map(row, field_map or {}))
    prompt, chosen, rejected = PAIR_FORMATS[fmt](fields, source)
    _check_answer(chosen, "chosen", source)
    _check_answer(rejected, "rejected", source)
    if chosen == rejected:
        raise BadRow(SAME, f"{source}: chosen and rejected are the same; a pair needs two different answers")
    system = fields.get("system")
    if system is not None and not isinstance(system, str):
        raise BadRow(MALFORMED, f'{source}: "system" is {type(system).__name__}; expected text')
    return fmt, with_system_prompt(prompt, system or system_prompt), chosen, rejected


def _common(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


@dataclass
class Outcome:
    """One row read: its example, or why it makes none, and what tokenizing it took."""

    row: str
    example: dict | None = None
    fmt: str = ""
    reason: str = ""
    message: str = ""
    prompt_cut: bool = False
    answers_cut: bool = False
    shifted: bool = False  # the tokenized prompt was not a prefix of the tokenized conversation


class PairEncoder:
    """Renders and tokenizes rows into pairs under one tokenizer, template and set of length limits."""

    def __init__(
        self,
        tokenizer,
        cfg: DataConfig,
        max_length: int | None,
        max_prompt_length: int | None,
        truncation_mode: str,
    ) -> None:
        self.tokenizer, self.cfg = tokenizer, cfg
        self.max_length, self.max_prompt_length, self.keep_end = (
            max_length,
            max_prompt_length,
            truncation_mode == "keep_end",
        )
        self.render = Renderer(tokenizer, resolve_template(tokenizer, cfg.template))
        self.eos = getattr(tokenizer, "eos_token_id", None)

    def encode(self, rows: list[tuple[str, dict]]) -> list[Outcome]:
        """Outcomes of a chunk of (source, row): rendered one by one, tokenized in one batch."""
        outcomes, texts, pending = [], [], []
        for source, row in rows:
            outcome = Outcome(source)
            try:
                outcome.fmt, prompt, chosen, rejected = to_pair(row, source, self.cfg.field_map, self.cfg.system_prompt)
                rendered = [self.render(prompt, True, source)]
                closed = []  # per answer: whether the template writes something after it (an end-of-turn marker)
                for answer in (chosen, rejected):
                    rendered.append(self.render(prompt + answer, False, source).rstrip())
                    closed.append(not rendered[-1].endswith(answer[-1]["content"].rstrip()))
            except BadRow as e:
                outcome.reason, outcome.message = e.reason, str(e)
            except DataError as e:  # the template cannot render the row
                outcome.reason, outcome.message = MALFORMED, str(e)
            else:
                texts += rendered
                pending.append((outcome, closed))
            outcomes.append(outcome)
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        for k, (outcome, closed) in enumerate(pending):
            try:
                self._example(outcome, *ids[3 * k : 3 * k + 3], closed)
            except BadRow as e:
                outcome.reason, outcome.message = e.reason, str(e)
        return outcomes

    def _example(
        self, out: Outcome, prompt: list[int], chosen: list[int], rejected: list[int], closed: list[bool]
    ) -> None:
        n = min(_common(prompt, chosen), _common(prompt, rejected))
        if n == 0:
            raise BadRow(
                MALFORMED,
                f"{out.row}: the chat template renders the prompt differently from the start of the conversation, "
                f"so the prompt's tokens cannot be found; set chat_template to a built-in template",
            )
        out.shifted = n < len(prompt)
        answers = [list(chosen[n:]), list(rejected[n:])]
        for answer, has_closer in zip(answers, closed, strict=True):
            if not has_closer and self.eos is not None:
                answer.append(self.eos)
        out.example = self._fit(out, list(chosen[:n]), *answers)

    def _fit(self, out: Outcome, prompt: list[int], chosen: list[int], rejected: list[int]) -> dict:
        """The example after max_prompt_length and max_length (see the module docstring)."""
        limit = self.max_prompt_length
        if limit is not None and len(prompt) > limit:
            prompt, out.prompt_cut = (prompt[-limit:] if self.keep_end else prompt[:limit]), True
        if self.max_length is not None:
            room = self.max_length - len(prompt)
            if room < 1:
                cap = f" (max_prompt_length {limit:,})" if limit is not None else " (max_prompt_length unset)"
                raise BadRow(
                    NO_ROOM,
                    f"{out.row}: the prompt has {len(prompt):,} tokens{cap}, leaving no room for the answer within "
                    f"max_length {self.max_length:,}; raise max_length, or set max_prompt_length below it",
                )
            if max(len(chosen), len(rejected)) > room:
                chosen, rejected, out.answers_cut = chosen[:room], rejected[:room], True
        if chosen == rejected:
            why = (
                f"after truncation to max_length {self.max_length:,}; raise max_length so that they differ"
                if out.answers_cut
                else "as rendered; a pair needs two different answers"
            )
            raise BadRow(SAME, f"{out.row}: chosen and rejected are the same {len(chosen):,} tokens {why}")
        ids = {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}
        return {"row": out.row, **{k: np.asarray(v, dtype=np.int32) for k, v in ids.items()}}


@dataclass
class RowCounts:
    """Rows read, used and dropped by reason, with the first SHOWN messages: shared by the preference and prompt
    datasets' stats."""

    name: str = "train"
    source: str = ""
    rows_read: int = 0
    rows_used: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> rows
    errors: list[str] = field(default_factory=list)  # the first SHOWN "file:line: reason" messages

    @property
    def rows_dropped(self) -> int:
        """Rows that gave nothing to train on, for any reason."""
        return sum(self.dropped.values())

    def count(self, used: bool, reason: str | None = None, message: str | None = None) -> None:
        """Count one row read: used, or dropped for `reason` with `message`."""
        self.rows_read += 1
        if used:
            self.rows_used += 1
            return
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        if len(self.errors) < SHOWN:
            self.errors.append(message)


@dataclass
class PreferenceStats(RowCounts):
    """What happened to every row read: a pair used, or dropped (with the reason), and the tokens that came out."""

    formats: dict[str, int] = field(default_factory=dict)  # format -> pairs used
    max_length: int | None = None
    max_prompt_length: int | None = None
    truncation_mode: str = "keep_end"
    prompt_cut: int = 0
    answers_cut: int = 0
    truncated: int = 0  # pairs with either cut
    shifted: int = 0
    prompt_tokens: int = 0
    chosen_tokens: int = 0
    rejected_tokens: int = 0

    def add(self, out: Outcome) -> None:
        """Count one row read."""
        self.count(out.example is not None, out.reason, out.message)
        if out.example is None:
            return
        e = out.example
        self.formats[out.fmt] = self.formats.get(out.fmt, 0) + 1
        self.prompt_cut += out.prompt_cut
        self.answers_cut += out.answers_cut
        self.truncated += out.prompt_cut or out.answers_cut
        self.shifted += out.shifted
        self.prompt_tokens += len(e["prompt_ids"])
        self.chosen_tokens += len(e["chosen_ids"])
        self.rejected_tokens += len(e["rejected_ids"])


class PreferenceDataset(Sequence[dict]):
    """Tokenized pairs {"prompt_ids", "chosen_ids", "rejected_ids", "row"} with the stats of how they were made."""

    def __init__(self, pairs: list[dict], stats: PreferenceStats) -> None:
        self.pairs = pairs  # token ids held as int32 arrays (a Python int list costs ~9x the memory)
        self.stats = stats

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int | slice) -> dict | list[dict]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        pair = self.pairs[index]
        return {"row": pair["row"], **{f"{side}_ids": pair[f"{side}_ids"].tolist() for side in SIDES}}

    def __iter__(self) -> Iterator[dict]:
        return (self[i] for i in range(len(self)))

    @property
    def lengths(self) -> list[int]:
        """Tokens of each pair's longer sequence (prompt + the longer answer)."""
        return [len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in self.pairs]

    def report(self) -> str:
        """A summary: rows read, pairs used, rows dropped (how many and why), truncation and tokens; then the first
        dropped rows' messages, one a line."""
        s = self.stats
        fmt = ", ".join(f"{name} {n:,}" for name, n in s.formats.items()) if len(s.formats) > 1 else ""
        fmt = f"formats {fmt}" if fmt else f"format {next(iter(s.formats), 'none')}"
        parts = [f"{s.name}: read {s.rows_read:,} rows from {s.source} ({fmt}), used {s.rows_used:,} pairs"]
        if s.dropped:
            reasons = ", ".join(f"{n:,} {reason}" for reason, n in sorted(s.dropped.items(), key=lambda kv: -kv[1]))
            parts.append(f"dropped {s.rows_dropped:,} ({reasons})")
        else:
            parts.append("dropped none")
        if s.truncated:
            cuts = []
            if s.prompt_cut:
                cuts.append(
                    f"prompt cut to max_prompt_length {s.max_prompt_length:,} ({s.truncation_mode}) in {s.prompt_cut:,}"
                )
            if s.answers_cut:
                cuts.append(f"answers cut to fit max_length {s.max_length:,} in {s.answers_cut:,}")
            parts.append(f"truncated {s.truncated:,} pairs: {', '.join(cuts)}")
        if s.shifted:
            parts.append(
                f"in {s.shifted:,} pairs the tokenized prompt is not a prefix of the tokenized conversation; "
                f"their prompt ends where the two part"
            )
        total = s.prompt_tokens + s.chosen_tokens + s.rejected_tokens
        parts.append(
            f"{total:,} tokens: prompts {s.prompt_tokens:,}, chosen {s.chosen_tokens:,}, rejected {s.rejected_tokens:,}"
        )
        text = ", ".join(parts[:2]) + "; " + "; ".join(parts[2:]) + "."
        shown = "".join(f"\n  dropped {message}" for message in s.errors)
        more = f"\n  ... and {s.rows_dropped - len(s.errors):,} more" if s.rows_dropped > len(s.errors) else ""
        return text + shown + more


def show_pair(example: dict, tokenizer) -> str:
    """A pair decoded, special tokens included: the prompt, then each answer, under labels."""
    parts = []
    for side in SIDES:
        ids = example[f"{side}_ids"]
        parts.append(f"[{side}: {len(ids):,} tokens]\n{tokenizer.decode(ids, skip_special_tokens=False)}")
    return "\n".join(parts)


def _check_format(cfg: DataConfig) -> None:
    if cfg.format != "auto":
        raise ConfigError(
            f"dataset_format is {cfg.format!r}, a format of SFT rows; preference pairs are told apart by their fields "
            f"(prompt, chosen, rejected); remove dataset_format, and rename fields with field_map if needed"
        )


def _check_limits(max_length: int | None, max_prompt_length: int | None, truncation_mode: str) -> None:
    if truncation_mode not in TRUNCATION_MODES:
        raise ConfigError(f"truncation_mode is {truncation_mode!r}; choose one of: {', '.join(TRUNCATION_MODES)}")
    for name, value, low in (("max_length", max_length, 2), ("max_prompt_length", max_prompt_length, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ConfigError(f"{name} is {value!r}; expected a whole number >= {low} (or unset)")


def encode_rows(rows: Iterator[tuple[str, dict]], encoder: PairEncoder) -> list[Outcome]:
    """The outcome of every row, in order."""
    outcomes: list[Outcome] = []
    try:
        while chunk := list(itertools.islice(rows, CHUNK)):
            outcomes += encoder.encode(chunk)
    finally:
        getattr(rows, "close", lambda: None)()  # the reader's file
    return outcomes


def make_dataset(
    outcomes: list[Outcome], name: str, source: str, encoder: PairEncoder, bad_rows: str
) -> PreferenceDataset:
    """The dataset of the pairs among `outcomes`, with their stats; DataError when none is usable (or, with
    bad_rows="fail", when any row is bad)."""
    stats = PreferenceStats(
        name=name,
        source=source,
        max_length=encoder.max_length,
        max_prompt_length=encoder.max_prompt_length,
        truncation_mode="keep_end" if encoder.keep_end else "keep_start",
    )
    for outcome in outcomes:
        stats.add(outcome)
    dataset = PreferenceDataset([o.example for o in outcomes if o.example is not None], stats)
    if not stats.rows_used or (bad_rows == "fail" and stats.rows_dropped):
        what = f"no usable {name} pairs" if not stats.rows_used else f"{stats.rows_dropped:,} {name} rows make no pair"
        more = (
            f" (and {stats.rows_dropped - len(stats.errors):,} more)" if stats.rows_dropped > len(stats.errors) else ""
        )
        raise DataError(f"{what} in {source}: {'; '.join(stats.errors) or 'the data has no rows'}{more}")
    assert stats.rows_read == stats.rows_used + stats.rows_dropped
    return dataset


def build_preference_datasets(
    cfg: DataConfig,
    tokenizer,
    max_length: int | None = None,
    max_prompt_length: int | None = 512,
    truncation_mode: str = "keep_end",
    *,
    bad_rows: str = "drop",
) -> tuple[PreferenceDataset, PreferenceDataset | None]:
    """Read, render and tokenize preference pairs: (train, eval), eval from cfg.eval_path or cfg.eval_split.

    max_length (prompt + answer; default cfg.max_seq_length), max_prompt_length and truncation_mode are TRL's.
    Rows that make no pair are dropped and reported (bad_rows="fail": raise instead). Not cached on disk: pairs
    tokenize in one batched pass.
    """
    if cfg.path is None:
        raise ConfigError(
            "no dataset is set; set dataset to a .jsonl, .json, .csv or .parquet file of preference pairs"
        )
    if bad_rows not in BAD_ROWS:
        raise ConfigError(f"bad_rows is {bad_rows!r}; choose one of: {', '.join(BAD_ROWS)}")
    _check_format(cfg)
    max_length = cfg.max_seq_length if max_length is None else max_length
    _check_limits(max_length, max_prompt_length, truncation_mode)
    encoder = PairEncoder(tokenizer, cfg, max_length, max_prompt_length, truncation_mode)
    train = encode_rows(open_source(cfg.path, cfg.split).rows(), encoder)
    if cfg.eval_path is not None:
        held = encode_rows(open_source(cfg.eval_path, None, for_eval=True).rows(), encoder)
        return make_dataset(train, "train", cfg.path, encoder, bad_rows), make_dataset(
            held, "eval", cfg.eval_path, encoder, bad_rows
        )
    if cfg.eval_split > 0:
        kept, held = split_indices(len(train), cfg.eval_split, cfg.seed)
        where = f"{cfg.path}, held out by eval_split {cfg.eval_split}"
        eval_set = make_dataset([train[i] for i in held], "eval", where, encoder, bad_rows)
        return make_dataset([train[i] for i in kept], "train", cfg.path, encoder, bad_rows), eval_set
    return make_dataset(train, "train", cfg.path, encoder, bad_rows), None


def first_row(path: str, split: str | None = None) -> tuple[str, dict] | None:
    """(source, row) of the first row of a data file or saved dataset; None when it has none."""
    rows = open_source(path, split).rows()
    try:
        return next(rows, None)
    finally:
        getattr(rows, "close", lambda: None)()  # the reader's file


def is_preference_file(path: str, field_map: dict[str, str] | None = None, split: str | None = None) -> bool:
    """Whether the first row of a local data file is a preference pair (False for an empty file or a hub dataset)."""
    if hf_datasets.looks_like_hub_name(path):
        return False
    first = first_row(path, split)
    return first is not None and detect_preference(first[1], field_map)


def check_preference_file(path: str, field_map: dict[str, str] | None = None, split: str | None = None) -> str | None:
    """Read the first row of a data file and return its preference format; raise DataError in milliseconds,
    before a model loads, when the file is missing, empty, malformed or not preference data. None for a hub
    dataset, which training reads itself."""
    if hf_datasets.looks_like_hub_name(path):
        return None
    first = first_row(path, split)
    if first is None:
        raise DataError(f"{path}: no rows found; the file is empty (or holds only blank lines)")
    source, row = first
    if not detect_preference(row, field_map):
        raise DataError(
            f"{source}: not preference data: no chosen and rejected fields (this row has: "
            f"{', '.join(map(str, row)) or 'no fields'}); DPO and ORPO need rows of prompt, chosen and rejected. "
            f"Rename your fields with field_map, or train on this file with method sft"
        )
    return row_format(row, source, field_map)


def check_preference_files(cfg: DataConfig) -> None:
    """check_preference_file on the training data and the eval data."""
    _check_format(cfg)
    if cfg.path is not None:
        check_preference_file(cfg.path, cfg.field_map, cfg.split)
    if cfg.eval_path is not None:
        check_preference_file(cfg.eval_path, cfg.field_map)
