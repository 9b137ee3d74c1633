"""`velotune train --use_dora`: a tiny run trains the magnitudes with A and B, saves a DoRA adapter in PEFT's
format, and resumes from its checkpoint; `use_dora` is a config key like PEFT's."""

import json

import torch
from safetensors.torch import load_file

from velotune.cli.main import main
from velotune.train.config import PACKAGE_DATA, run_config_from_dict

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
        "--use_dora",
        "--learning_rate",
        "1e-2",
        "--lr_scheduler_type",
        "constant",  # the same schedule for a run of 2 steps and one of 4: their curves can be compared
        "--warmup_steps",
        "0",
        *extra,
    ]


def test_use_dora_is_a_config_key():
    assert run_config_from_dict({"use_dora": True}).lora.use_dora
    assert not run_config_from_dict({}).lora.use_dora


def _losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def test_dora_run_saves_a_dora_adapter_and_resumes_on_the_same_curve(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    argv = _train(tiny_model_dir, out, "--max_steps", "4", "--save_steps", "2")
    assert main(argv) == 0
    whole = _losses(out)
    assert main(argv + ["--resume", str(out / "checkpoint-2")]) == 0  # steps 3 and 4 again, from the checkpoint
    assert len(whole) == 4
    torch.testing.assert_close(_losses(out), whole, rtol=1e-5, atol=1e-6)
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["use_dora"] is True
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert sum(k.endswith(".lora_magnitude_vector") for k in adapter) == 7 * 2  # every projection, 2 layers
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    start = base["model.layers.0.mlp.up_proj.weight"].float().norm(dim=1)
    trained = adapter["base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector"]
    assert not torch.allclose(trained, start, rtol=1e-4)  # the magnitudes trained (they start at ||W||)
