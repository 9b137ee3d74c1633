"""The chat pane's answers: a finished run's model (or a checkpoint's) through the generation engine, loaded the
way `velotune generate` loads it and kept while the page asks it questions."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from velotune.errors import ConfigError
from velotune.train.checkpoint import PREFIX

MAX_NEW_TOKENS = 1024


class Chat:
    """One model loaded at a time (the last one asked for); one answer at a time."""

    def __init__(self) -> None:
        self._key: tuple[Path, str | None] | None = None
        self._model: Any = None
        self._tok: Any = None
        self._lock = threading.Lock()

    def _load(self, run_dir: Path, checkpoint: str | None) -> tuple[Any, Any]:
        from velotune.train.load_run import load_checkpoint_for_generation, load_for_generation

        if self._key != (run_dir, checkpoint):
            self._model = self._tok = None  # the previous model's memory goes before the next loads
            if checkpoint is None:
                self._model, self._tok = load_for_generation(str(run_dir))
            else:
                self._model, self._tok = load_checkpoint_for_generation(run_dir / checkpoint)
            self._key = (run_dir, checkpoint)
        return self._model, self._tok

    def answer(
        self,
        run_dir: Path,
        checkpoint: str | None,
        messages: list[dict[str, str]],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
    ) -> str:
        """The model's reply to a conversation (the chat template applied, as `velotune chat` does)."""
        from velotune.data import render_prompt
        from velotune.models.generate import SamplingParams, generate_batch, stop_token_ids

        _check(messages, checkpoint, max_new_tokens, temperature)
        with self._lock:
            model, tok = self._load(run_dir, checkpoint)
            ids = tok(render_prompt(messages, tok, None, None), add_special_tokens=False)["input_ids"]
            params = SamplingParams(
                max_new_tokens=max_new_tokens, temperature=temperature, eos_token_ids=stop_token_ids(tok)
            )
            return generate_batch(model, [ids], params, tokenizer=tok)[0].text


def _check(messages: Any, checkpoint: str | None, max_new_tokens: Any, temperature: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ConfigError("messages: expected a list of {role, content} turns, the last one the user's")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ConfigError(f"messages: each turn needs a role of system, user or assistant; found {m!r}")
        if not isinstance(m.get("content"), str):
            raise ConfigError(f"messages: each turn needs its content as text; found {m!r}")
    if messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise ConfigError("the last message must be the user's, and not empty")
    if checkpoint is not None and (not checkpoint.startswith(PREFIX) or "/" in checkpoint):
        raise ConfigError(f"checkpoint {checkpoint!r}: expected a name like checkpoint-100")
    if not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise ConfigError(f"max_new_tokens: expected a whole number from 1 to {MAX_NEW_TOKENS}")
    if not isinstance(temperature, int | float) or not 0 <= temperature <= 5:
        raise ConfigError("temperature: expected a number from 0 (greedy) to 5")
