"""`velotune train` options around the loop: curves PNG and metrics rows, reporting integrations, partial
fine-tuning, and the bad inputs a user makes (no targets in the data, settings that need others, changed settings on
resume)."""

import json

import pytest
import torch

from tests.helpers import velotune_from_hf
from velotune.cli.main import main
from velotune.errors import ConfigError
from velotune.train.config import PACKAGE_DATA, run_config_from_dict
from velotune.train.run import freeze_for_partial

EVAL = str(PACKAGE_DATA / "iso_dates_eval.jsonl")


def _train(model_dir, out, *extra: str) -> list[str]:
    return [
        "train",
        "--model",
        str(model_dir),
        "--dataset",
        EVAL,
        "--per_device_train_batch_size",
        "2",
        "--compare_samples",
        "0",
        "--no_progress",
        "--output_dir",
        str(out),
        *extra,
    ]


def test_run_writes_metrics_eval_rows_and_training_curves(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = _train(tiny_model_dir, out, "--max_steps", "4", "--eval_dataset", EVAL, "--eval_steps", "2")
    assert main(argv + ["--report_to", "tensorboard"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4]
    assert {"loss", "lr", "grad_norm", "tokens"} <= set(rows[0])
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "training_curves.png" in printed
    tensorboard = (out / "tensorboard").is_dir() or "tensorboard package is not installed" in printed
    assert tensorboard
    summary = json.loads((out / "summary.json").read_text())
    assert summary["last_checkpoint"].endswith("checkpoint-4") and summary["skipped_steps"] == []


def test_partial_finetuning_trains_top_layers_norm_and_head(tiny_hf_llama):
    model = velotune_from_hf(tiny_hf_llama)
    assert freeze_for_partial(model, 1) == 1
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in model.named_parameters() if n.startswith("model.layers.1.")} | {
        "model.norm.weight",
        "lm_head.weight",
    }
    assert freeze_for_partial(model, 0.5) == 1  # a fraction of the 2 layers
    with pytest.raises(ConfigError, match="train_layers: 3, but the model has 2 decoder layers"):
        freeze_for_partial(model, 3)


def test_partial_finetuning_run_leaves_lower_layers_unchanged(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    argv = _train(tiny_model_dir, out, "--max_steps", "2", "--finetuning", "partial", "--train_layers", "1")
    assert main(argv + ["--learning_rate", "1e-2"]) == 0
    before, after = (
        load_file(str(tiny_model_dir / "model.safetensors")),
        load_file(str(out / "merged/model.safetensors")),
    )
    name0, name1 = "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(before[name0], after[name0].to(before[name0].dtype))
    assert not torch.equal(before[name1], after[name1].to(before[name1].dtype))


def test_dataset_without_targets_stops_with_the_rendered_example(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "chats.jsonl"
    data.write_text(
        "".join(json.dumps({"messages": [{"role": "user", "content": f"hi {i}"}]}) + "\n" for i in range(3))
    )
    argv = _train(tiny_model_dir, tmp_path / "run", "--max_steps", "2")
    argv[argv.index(EVAL)] = str(data)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no usable train rows" in err and "no target tokens" in err
    assert f"{data}:1 as the model sees it" in err
    assert "[masked]<|im_start|>" in err and "hi 0" in err  # the rendered conversation, all of it masked
    assert "train_on: all" in err


def test_settings_that_need_others_say_which():
    with pytest.raises(ConfigError, match="eval_steps: 5 needs eval data; set eval_dataset"):
        run_config_from_dict({"dataset": "x.jsonl", "eval_steps": 5})
    with pytest.raises(ConfigError, match="early_stopping_patience: 3 watches the eval loss.*set eval_steps"):
        run_config_from_dict({"dataset": "x.jsonl", "eval_dataset": "y.jsonl", "early_stopping_patience": 3})
    with pytest.raises(ConfigError, match="finetuning: partial needs train_layers"):
        run_config_from_dict({"finetuning": "partial"})
    with pytest.raises(ConfigError, match="train_layers: 4.0 applies to finetuning: partial"):
        run_config_from_dict({"train_layers": 4})
    with pytest.raises(ConfigError, match="partial fine-tuning needs 16-bit weights"):
        run_config_from_dict({"finetuning": "partial", "train_layers": 2, "load_in_4bit": True})
    with pytest.raises(ConfigError, match="report_to: 'tensorbord' is not valid; choose one of: none, tensorboard"):
        run_config_from_dict({"report_to": "tensorbord"})


def test_resume_with_changed_settings_names_them(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train(tiny_model_dir, out, "--max_steps", "2", "--save_steps", "1")) == 0
    capsys.readouterr()
    assert main(_train(tiny_model_dir, out, "--max_steps", "4", "--lora_r", "8", "--resume")) == 2
    err = capsys.readouterr().err
    assert "checkpoint-2: the checkpoint was trained with other settings (lora_r: 16 -> 8)" in err
    assert "start a new run in another output_dir" in err


def test_load_best_model_at_end_saves_the_lowest_eval_loss_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from velotune.train import loop

    scripted = iter([2.0, 1.0, 3.0, 1.0])  # evaluations at steps 2, 4, 6 (the best: checkpoint-4), then the final
    monkeypatch.setattr(loop, "evaluate_loss", lambda *args: next(scripted))
    out = tmp_path / "run"
    extra = ["--max_steps", "6", "--eval_dataset", EVAL, "--eval_steps", "2", "--save_steps", "2"]
    argv = _train(tiny_model_dir, out, *extra, "--save_total_limit", "1", "--learning_rate", "1e-2")
    assert main(argv + ["--load_best_model_at_end", "true"]) == 0
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    best, last = (load_file(str(out / f"checkpoint-{s}" / "trainable.safetensors")) for s in (4, 6))
    assert json.loads((out / "summary.json").read_text())["best_checkpoint"] == "checkpoint-4"
    for name, value in best.items():
        key = "base_model.model." + name + ".weight"
        torch.testing.assert_close(adapter[key], value.to(adapter[key].dtype))
    assert any(not torch.equal(best[n], last[n]) for n in best)


def test_load_best_model_at_end_needs_evaluations_at_checkpoints():
    with pytest.raises(ConfigError, match="load_best_model_at_end needs an evaluation at every checkpoint"):
        run_config_from_dict({"load_best_model_at_end": True, "eval_steps": 3, "save_steps": 4})


def test_checkpoint_layers_auto_runs(tiny_model_dir, tmp_path):
    """`--gradient_checkpointing_layers auto` is accepted end to end (on CPU it checkpoints every layer)."""
    out = tmp_path / "run"
    assert main(_train(tiny_model_dir, out, "--max_steps", "2", "--gradient_checkpointing_layers", "auto")) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
