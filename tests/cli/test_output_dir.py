"""A run without output_dir records the directory it used (so --resume finds it), and Ctrl-C before the first step
says that nothing was trained and leaves no empty run directory."""

from __future__ import annotations

from pathlib import Path

import yaml

from velotune.cli.main import main
from velotune.train.config import PACKAGE_DATA


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_ctrl_c_before_training_removes_the_empty_run_dir_and_says_so(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from velotune.train import run as run_module

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run_module, "load_quantized", _interrupt)  # Ctrl-C while the model loads
    code = main(["train", "--model", str(tiny_model_dir), "--dataset", str(PACKAGE_DATA / "iso_dates_eval.jsonl")])
    assert code == 130
    err = capsys.readouterr().err
    assert "interrupted before the first training step; nothing was trained" in err
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.iterdir())


def test_default_output_dir_is_recorded_in_config_yaml(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["train", "--model", str(tiny_model_dir), "--dataset", str(PACKAGE_DATA / "iso_dates_eval.jsonl")]
    assert main([*args, "--max_steps", "1", "--compare_samples", "0", "--no_progress"]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["output_dir"] and Path(saved["output_dir"]).resolve() == run_dir.resolve()
