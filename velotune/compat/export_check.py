"""Checks an export against the model it came from; a mismatch raises ExportError, never a warning.

Three things are compared, each on a short chat prompt:

- Next-token distributions. The in-memory model (adapters unmerged) continues the prompt greedily for
  CHECK_TOKENS tokens; the reloaded export then reads prompt + continuation in one pass. The mean over those
  positions of KL(model || export), in nats, must stay within the format's TOLERANCE_KL. Measured on SmolLM2-135M
  (4-bit base + LoRA, float32 CPU reference, velotune's merge, GGUF writer and GGUF importer): merged bf16 1e-4,
  f16 < 1e-5, q8_0 9e-4, q4_k_m 0.040; broken exports: adapters not merged 0.51, two adjacent layers swapped
  (bf16) 0.13. The bounds sit 5-100x above the correct exports and below those failures (q4_k_m's bound is above
  the layer swap: a 4-bit export is too lossy to tell that one apart).
- Tokenizer. The export's tokenizer must give the prompt and continuation the same ids (the merged directory's
  tokenizer re-encodes the text; a GGUF's token list must hold the same strings at those ids).
- Stop token. The token closing an assistant turn in the chat template must be one the export stops at:
  config.json / generation_config.json eos_token_id for merged models; the GGUF's EOS or EOT id, or a Modelfile
  stop string, for GGUF.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from velotune.errors import ExportError
from velotune.models.decoder import CausalLM
from velotune.models.generate import generate

CHECK_TOKENS = 8
TOLERANCE_KL = {  # mean KL(model || export) in nats over the checked positions
    "merged_16bit": 0.02,
    "f32": 0.02,
    "f16": 0.02,
    "bf16": 0.02,
    "q8_0": 0.03,
    "q6_k": 0.06,
    "q5_k_m": 0.1,
    "q4_k_m": 0.2,
}
PROBE_MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow."}]
PROBE_TEXT = "The three primary colours are"


@dataclass
class Probe:
    """The reference model's view of one prompt: ids, where the continuation starts, log-probs from there on."""

    text: str
    ids: list[int]
    prompt_len: int
    logprobs: torch.Tensor  # [N, V] float32, positions prompt_len-1 .. len(ids)-1

    @property
    def targets(self) -> torch.Tensor:
        return self.logprobs.argmax(-1)  # [N] the reference's greedy choice at each position


@torch.no_grad()
def _logprobs(lm: CausalLM, ids: list[int], start: int) -> torch.Tensor:
    was_training = lm.training
    lm.eval()
    try:
        x = torch.tensor([ids], device=lm.device)
        logits = lm(x, return_logits=True).logits[0, start:].float()  # [N, V]
    finally:
        lm.train(was_training)
    return torch.log_softmax(logits, dim=-1).cpu()


def make_probe(lm: CausalLM, tokenizer: Any, stop_ids: list[int]) -> Probe:
    """Prompt (chat template if the tokenizer has one), greedy continuation and log-probs of the reference."""
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(PROBE_MESSAGES, tokenize=False, add_generation_prompt=True)
    else:
        prompt = PROBE_TEXT
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    cont = generate(lm, prompt_ids, max_new_tokens=CHECK_TOKENS, eos_token_id=stop_ids)
    ids = prompt_ids + cont
    return Probe(prompt + tokenizer.decode(cont), ids, len(prompt_ids), _logprobs(lm, ids, len(prompt_ids) - 1))


def compare_logprobs(probe: Probe, export: CausalLM, what: str, tolerance: float, tokenizer: Any) -> float:
    """ExportError unless the mean KL(model || export) over the probe's positions is within `tolerance` nats;
    returns that mean."""
    if export.config.vocab_size != probe.logprobs.shape[-1]:
        raise ExportError(
            f"{what}: vocabulary of {export.config.vocab_size} tokens, the model has {probe.logprobs.shape[-1]}"
        )
    theirs = _logprobs(export, probe.ids, probe.prompt_len - 1)  # [N, V]
    ours = probe.logprobs
    kl = (ours.exp() * (ours - theirs)).sum(-1)  # [N]
    if float(kl.mean()) > tolerance:
        worst = int(kl.argmax())
        pos = probe.prompt_len + worst
        ref_tok = tokenizer.decode([int(ours[worst].argmax())])
        exp_tok = tokenizer.decode([int(theirs[worst].argmax())])
        raise ExportError(
            f"{what} does not reproduce the model: mean KL divergence {float(kl.mean()):.4f} nats over "
            f"{len(kl)} positions (tolerance {tolerance}); e.g. after {tokenizer.decode(probe.ids[:pos])[-60:]!r} "
            f"the model predicts {ref_tok!r}, the export {exp_tok!r} (KL {float(kl[worst]):.3f}). "
            "The exported files are not a faithful copy"
        )
    return float(kl.mean())


def check_tokenizer_dir(probe: Probe, model_dir: Path, what: str) -> None:
    """The tokenizer saved in `model_dir` must encode the probe text to the same ids."""
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(str(model_dir))
    ids = list(saved(probe.text, add_special_tokens=False)["input_ids"])
    if ids != probe.ids:
        raise ExportError(
            f"{what}: the saved tokenizer encodes the check prompt differently ({len(ids)} tokens vs "
            f"{len(probe.ids)}); save the tokenizer the model was trained with"
        )


def check_merged_stop(model_dir: Path, end_of_turn: int, tokenizer: Any) -> None:
    """config.json or generation_config.json must list the end-of-turn token as an EOS id."""
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        path = model_dir / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            ids |= {eos} if isinstance(eos, int) else set(eos or ())
    if end_of_turn not in ids:
        raise ExportError(
            f"{model_dir}: the chat template ends a reply with {tokenizer.decode([end_of_turn])!r} (id {end_of_turn}) "
            f"but the export stops at ids {sorted(ids)}; generation would run past the end of each reply"
        )


def gguf_metadata(path: Path) -> tuple[list[str], set[int]]:
    """(token strings, stop ids: EOS / EOT / EOM) of a GGUF file."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    fields = reader.fields
    tokens = [str(t) for t in fields["tokenizer.ggml.tokens"].contents()]
    stops = {
        int(fields[k].contents())
        for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
        if k in fields
    }
    return tokens, stops


def check_gguf_tokens(probe: Probe, path: Path, tokenizer: Any, end_of_turn: int, stop_strings: list[str]) -> None:
    """The GGUF's vocabulary holds the probe's tokens at the same ids, and it stops at the end-of-turn token."""
    tokens, stops = gguf_metadata(path)
    ours = tokenizer.convert_ids_to_tokens(probe.ids)
    bad = [
        (i, o, tokens[i] if i < len(tokens) else None)
        for i, o in zip(probe.ids, ours, strict=True)
        if i >= len(tokens) or tokens[i] != o
    ]
    if bad:
        i, o, t = bad[0]
        raise ExportError(
            f"{path}: token id {i} is {t!r} in the GGUF but {o!r} in the tokenizer; the vocabulary was written wrongly"
        )
    eot_text = tokenizer.convert_ids_to_tokens(end_of_turn)
    if end_of_turn not in stops and eot_text not in stop_strings:
        raise ExportError(
            f"{path}: the chat template ends a reply with {eot_text!r} (id {end_of_turn}) but the GGUF stops at ids "
            f"{sorted(stops)} and the Modelfile at {stop_strings}; set tokenizer.eos_token to {eot_text!r} "
            "(get_chat_template(..., map_eos_token=True) does) and export again"
        )
