"""Tokenizer metadata for a GGUF file, read straight from a Hugging Face model directory.

llama.cpp's converter loads the tokenizer through transformers and names the pre-tokenizer by hashing its output on
a probe text against a table of known hashes. We read tokenizer.json directly and name the pre-tokenizer from its
split rule instead, so export needs no tokenizer instance and no hash table. Two vocabulary kinds are written:

- byte-level BPE (tokenizer.json model "BPE", no byte fallback): tokenizer.ggml.model "gpt2", merges, pre name.
- SentencePiece-style BPE (model "BPE" with byte_fallback, as Llama 2 / Mistral ship): model "llama", scores.
  tokenizer.json has no SentencePiece scores; a piece's score is minus the rank of the first merge that builds it,
  which makes llama.cpp's highest-score-first merging follow the merge order.

Special-token ids, add_bos/add_eos, merges and the chat template come from gguf-py's `SpecialVocab`.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from gguf import GGUFWriter, SpecialVocab, TokenType

from velotune.errors import ExportError

log = logging.getLogger(__name__)

# Split regexes of known byte-level tokenizers -> llama.cpp's tokenizer.ggml.pre names.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_BY_SPLIT_REGEX: dict[str, str] = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _flatten(node: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A tokenizer.json normalizer/pre_tokenizer as a flat list of its steps."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        key = next((k for k in ("pretokenizers", "normalizers", "processors") if k in node), "")
        return [step for child in node.get(key, []) for step in _flatten(child)]
    return [node]


def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's name for a byte-level tokenizer's pre-tokenizer, from its split steps ("default" if unknown)."""
    steps = _flatten(tokenizer_json.get("pre_tokenizer"))
    for step in steps:
        regex = (step.get("pattern") or {}).get("Regex") if step.get("type") == "Split" else None
        if regex in PRE_BY_SPLIT_REGEX:
            return PRE_BY_SPLIT_REGEX[regex]
    kinds = [s.get("type") for s in steps]
    byte_level_regex = any(s.get("type") == "ByteLevel" and s.get("use_regex", True) for s in steps)
    if kinds == ["ByteLevel"] and byte_level_regex:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level_regex:
        return "smollm"  # digits split one by one, then GPT-2's regex (SmolLM, StarCoder)
    log.warning("unrecognised pre-tokenizer %s; writing tokenizer.ggml.pre = 'default'", json.dumps(steps)[:200])
    return "default"


def _add_bos_from_template(tokenizer_json: dict[str, Any]) -> bool:
    """Whether the post-processor puts a special token before the text (tokenizer_config has no add_bos_token)."""
    for proc in _flatten(tokenizer_json.get("post_processor")) or []:
        single = proc.get("single") if proc.get("type") == "TemplateProcessing" else None
        if single:
            return "SpecialToken" in single[0]
    return False


def _add_space_prefix(tokenizer_json: dict[str, Any]) -> bool:
    """SentencePiece-style tokenizers that prepend '▁' to the text, by normalizer or Metaspace pre-tokenizer."""
    for step in _flatten(tokenizer_json.get("normalizer")):
        if step.get("type") == "Prepend" and step.get("prepend") == "\u2581":
            return True
    for step in _flatten(tokenizer_json.get("pre_tokenizer")):
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always") != "never" and step.get("add_prefix_space", True)
    return False


def _merge_pairs(model: dict[str, Any]) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in model.get("merges", [])]


def _tokens(tokenizer_json: dict[str, Any], vocab_size: int, spm: bool, where: Path) -> tuple[list[str], list[int]]:
    """Token strings and TokenType values for ids 0..vocab_size-1; ids the tokenizer lacks become [PADi] UNUSED."""
    model = tokenizer_json["model"]
    tokens: list[str | None] = [None] * vocab_size
    types = [int(TokenType.UNUSED)] * vocab_size
    added = tokenizer_json.get("added_tokens") or []
    too_big = sorted(i for i in [*model["vocab"].values(), *(a["id"] for a in added)] if i >= vocab_size)
    if too_big:
        raise ExportError(
            f"{where}: token ids {too_big[:5]} are >= the model's vocab_size {vocab_size}; "
            "resize the embeddings to the tokenizer (model.resize_token_embeddings) before exporting"
        )
    unk = model.get("unk_token")
    for piece, i in model["vocab"].items():
        tokens[i] = piece
        if spm and _BYTE_PIECE.fullmatch(piece):
            types[i] = int(TokenType.BYTE)
        elif spm and piece == unk:
            types[i] = int(TokenType.UNKNOWN)
        else:
            types[i] = int(TokenType.NORMAL)
    for a in added:
        tokens[a["id"]] = a["content"]  # llama.cpp matches added tokens on the raw text
        if not (spm and a["content"] == unk):
            types[a["id"]] = int(TokenType.CONTROL if a.get("special") else TokenType.USER_DEFINED)
    return [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)], types


def _spm_scores(model: dict[str, Any], tokens: list[str]) -> list[float]:
    """Minus the rank of the first merge building each piece; pieces no merge builds score below every merge."""
    pairs = _merge_pairs(model)
    rank: dict[str, int] = {}
    for r, (a, b) in enumerate(pairs):
        rank.setdefault(a + b, r)
    floor = -float(len(pairs) + 1)
    return [-float(rank[t]) if t in rank else floor for t in tokens]


def read_tokenizer_json(model_dir: Path) -> dict[str, Any]:
    """tokenizer.json of `model_dir`, or ExportError saying how to provide it."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ExportError(
            f"{model_dir}: no tokenizer.json; GGUF files carry the tokenizer, so save it beside the weights "
            "(tokenizer.save_pretrained(model_dir)) and export again"
        )
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def add_tokenizer(writer: GGUFWriter, model_dir: Path, vocab_size: int) -> None:
    """Write tokenizer.ggml.* and tokenizer.chat_template for the tokenizer saved in `model_dir`."""
    tj = read_tokenizer_json(model_dir)
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise ExportError(
            f"{model_dir / 'tokenizer.json'}: tokenizer model {model.get('type')!r}; GGUF export supports BPE "
            "tokenizers (byte-level like Llama 3 / Qwen / SmolLM, or byte-fallback like Llama 2 / Mistral)"
        )
    spm = bool(model.get("byte_fallback"))
    tokens, types = _tokens(tj, vocab_size, spm, model_dir / "tokenizer.json")
    writer.add_tokenizer_model("llama" if spm else "gpt2")
    writer.add_tokenizer_pre("default" if spm else pre_tokenizer_name(tj))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if spm:
        writer.add_token_scores(_spm_scores(model, tokens))
        writer.add_add_space_prefix(_add_space_prefix(tj))
    special = SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    special.add_special_token.setdefault("bos", _add_bos_from_template(tj))
    special.add_special_token.setdefault("eos", False)
    special.add_to_gguf(writer, quiet=True)
