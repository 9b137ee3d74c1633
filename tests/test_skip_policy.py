"""The skip policy of tests/conftest.py: a run in which a test skipped for a reason other than a missing CUDA GPU (or
an opt-in marker) fails, and says which test and why. Checked on small pytest runs in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

ALLOWED = """
    import pytest

    def test_passes():
        pass

    def test_needs_cuda():
        pytest.skip("FlexAttention needs CUDA")

    @pytest.mark.skipif(True, reason="bf16 matmuls of this size need a GPU")
    def test_needs_a_gpu():
        pass

    @pytest.mark.llamacpp
    def test_opt_in_marker():
        pytest.importorskip("velotune_no_such_package", reason="pip install llama-cpp-python")

    @pytest.mark.xfail(reason="known")
    def test_expected_failure():
        assert False
"""
NOT_ALLOWED = """
    import pytest

    def test_passes():
        pass

    def test_missing_reference():
        pytest.importorskip("velotune_no_such_package", reason="bitsandbytes is an optional test-only reference")
"""
MODULE_SKIPPED = """
    import pytest

    pytest.importorskip("velotune_no_such_module")

    def test_never_collected():
        pass
"""


def _pytest(tmp_path: Path, files: dict[str, str]) -> subprocess.CompletedProcess:
    for name, text in files.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    cmd = [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider", "-q", "."]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")} | {"PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_skips_for_cuda_gpu_or_opt_in_markers_pass(tmp_path):
    run = _pytest(tmp_path, {"test_allowed.py": ALLOWED})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 passed, 3 skipped, 1 xfailed" in run.stdout
    assert "reason other than a missing CUDA GPU" not in run.stdout


def test_other_skips_fail_the_run_and_are_named(tmp_path):
    run = _pytest(
        tmp_path, {"test_allowed.py": ALLOWED, "test_not_allowed.py": NOT_ALLOWED, "test_module.py": MODULE_SKIPPED}
    )
    assert run.returncode == 1, run.stdout + run.stderr
    summary = run.stdout.split("reason other than a missing CUDA GPU", 1)[1]
    assert "test_not_allowed.py::test_missing_reference: bitsandbytes is an optional test-only reference" in summary
    assert "test_module.py: could not import 'velotune_no_such_module'" in summary
    assert "2 unexpected skip(s) fail the run" in summary
    assert "FlexAttention" not in summary and "llama-cpp-python" not in summary
