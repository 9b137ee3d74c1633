"""Where the Triton kernel tests run: "cuda" on a GPU machine, or "cpu" under Triton's interpreter
(TRITON_INTERPRET=1 with triton importable), where CPU tensors are sent to the kernels too. Elsewhere they skip.
Triton tests carry @pytest.mark.gpu and take the `triton_device` fixture.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from velotune.kernels._triton import HAS_TRITON, triton_on_cpu


@pytest.fixture
def triton_device() -> Iterator[str]:
    if HAS_TRITON and torch.cuda.is_available():
        yield "cuda"
    elif HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1":
        with triton_on_cpu():
            yield "cpu"
    else:
        pytest.skip("Triton kernels need a CUDA GPU (or TRITON_INTERPRET=1 with triton importable)")
