"""`velotune train` end to end: run directory contents, loss going down, outputs that other tools load."""

import json

import torch

from velotune.cli.main import main
from velotune.train.config import PACKAGE_DATA, run_config_from_dict, with_defaults
from velotune.train.run import run


def test_loss_decreases_on_bundled_data(smollm2, tmp_path):
    """A few LoRA steps of the embedded model on the bundled ISO-date data lower the training loss."""
    cfg = run_config_from_dict(
        with_defaults(
            {"output_dir": str(tmp_path), "max_steps": 6, "per_device_train_batch_size": 4, "compare_samples": 0}
        )
    )
    result = run(cfg, progress=False, log=lambda s: None)
    losses = result.train.losses
    assert len(losses) == 6
    assert sum(losses[-2:]) / 2 < 0.7 * losses[0]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 7))
    assert {"loss", "lr", "grad_norm", "tokens"} <= set(rows[0])
    assert [r["step"] for r in rows if "eval_loss" in r] == [6]  # the final evaluation, as the run prints it


def test_run_directory_outputs_load_elsewhere(tiny_model_dir, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--model",
            str(tiny_model_dir),
            "--dataset",
            str(PACKAGE_DATA / "iso_dates_eval.jsonl"),
            "--max_steps",
            "2",
            "--save_merged",
            "true",
            "--output_dir",
            str(out),
            "--no_progress",
            "--compare_samples",
            "0",
            "--learning_rate",
            "1e-2",
        ]
    )
    assert code == 0
    assert {"adapter", "merged", "config.yaml", "metrics.jsonl", "summary.json"} <= {p.name for p in out.iterdir()}
    ids = torch.tensor([[1, 5, 9, 33, 870]])
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    assert AutoTokenizer.from_pretrained(out / "merged").chat_template  # tokenizer and template travel along
    assert main(["generate", str(out), "--prompt", "Write May 1, 2000 as an ISO date.", "--max_new_tokens", "4"]) == 0
