"""Sliding windows llama.cpp does not apply are not dropped silently.

llama.cpp runs Mistral GGUF files as `llama` and reads no sliding window for it (nor for qwen2/qwen3; for phi3 it
reads one and switches it off), so such a file attends to every earlier token. Within the window that is the same
attention; beyond it the logits differ. The export says so, naming the context to run the file with. velotune's
own GGUF import reads Mistral files as llama too, so it stands in for llama.cpp here.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from velotune.export.gguf import export_gguf

VOCAB = 400
WINDOW = 8
SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)


def save(out: Path, tokenizer_dir: Path, cfg_name: str, cls_name: str, **overrides) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(getattr(transformers, cfg_name)(**{**SHAPE, **overrides})).eval()
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return model


def window_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "sliding_window" in r.getMessage()]


def logits(model: torch.nn.Module, n: int) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).logits.float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_mistral_window_shorter_than_context_is_warned_with_the_context_to_use(
    small_bpe_tokenizer_dir, tmp_path, caplog
):
    from velotune.models.load import load_model

    model = save(tmp_path / "m", small_bpe_tokenizer_dir, "MistralConfig", "MistralForCausalLM", sliding_window=WINDOW)
    with caplog.at_level(logging.WARNING, logger="velotune.export"):
        path = export_gguf(tmp_path / "m", tmp_path / "out" / "m.gguf", "f16", progress=False)
    (message,) = window_warnings(caplog)
    assert f"mistral: sliding_window {WINDOW} is shorter than the context (256 tokens)" in message
    assert f"-c {WINDOW}" in message and f"num_ctx {WINDOW}" in message

    # what the warning claims: without the window the file is the model up to WINDOW tokens, and not beyond
    unwindowed, _ = load_model(path, torch.float32, with_tokenizer=False)
    assert rel_err(logits(unwindowed, WINDOW), logits(model, WINDOW)) < 2e-3  # f16 weights: ~5e-4
    assert rel_err(logits(unwindowed, 3 * WINDOW), logits(model, 3 * WINDOW)) > 1e-3


@pytest.mark.parametrize(
    ("cfg_name", "cls_name", "overrides"),
    [
        ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0)),
        ("Phi3Config", "Phi3ForCausalLM", dict(sliding_window=WINDOW)),
    ],
)
def test_other_windows_llama_cpp_drops_are_warned(
    small_bpe_tokenizer_dir, tmp_path, caplog, cfg_name, cls_name, overrides
):
    save(tmp_path / "m", small_bpe_tokenizer_dir, cfg_name, cls_name, **overrides)
    with caplog.at_level(logging.WARNING, logger="velotune.export"):
        export_gguf(tmp_path / "m", tmp_path / "out" / "m.gguf", "f16", progress=False)
    assert len(window_warnings(caplog)) == 1


@pytest.mark.parametrize(
    ("cfg_name", "cls_name", "overrides"),
    [
        ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),  # Mistral 7B v0.2+
        ("MistralConfig", "MistralForCausalLM", dict(sliding_window=256)),  # window covers the context
        ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=False, sliding_window=WINDOW)),  # as released
        (
            "Gemma2Config",
            "Gemma2ForCausalLM",
            dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW, tie_word_embeddings=True),
        ),
    ],
)
def test_no_warning_when_the_file_computes_the_same_attention(
    small_bpe_tokenizer_dir, tmp_path, caplog, cfg_name, cls_name, overrides
):
    save(tmp_path / "m", small_bpe_tokenizer_dir, cfg_name, cls_name, **overrides)
    with caplog.at_level(logging.WARNING, logger="velotune.export"):
        export_gguf(tmp_path / "m", tmp_path / "out" / "m.gguf", "f16", progress=False)
    assert window_warnings(caplog) == []
