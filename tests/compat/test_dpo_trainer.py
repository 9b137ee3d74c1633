"""trl.DPOTrainer trains a FastLanguageModel with LoRA, given `ref_model=model.create_reference_model()` (or
precompute_ref_log_probs=True): the first loss is log 2 (policy = reference), the adapter moves, the reference stays,
and one step equals DPOTrainer on transformers + PEFT from the same weights.

The model is not a peft.PeftModel, so DPOTrainer cannot switch its adapter off for the reference; with neither
option it would load a second, transformers copy of the base checkpoint from its path instead."""

from __future__ import annotations

import copy
import math

import datasets
import pytest
import torch
import trl

from velotune.compat import FastLanguageModel
from velotune.lora.apply import ALL_PROJECTIONS, lora_layers

REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def _pairs() -> datasets.Dataset:
    rows = []
    for i in range(4):
        right, wrong = (" yes", " no") if i % 2 == 0 else (" no", " yes")
        rows.append({"prompt": f"Is {i * 7} even?", "chosen": right, "rejected": wrong})
    return datasets.Dataset.from_list(rows)


def _config(tmp_path, **overrides) -> trl.DPOConfig:
    kw = dict(
        output_dir=str(tmp_path / "dpo"),
        beta=0.1,
        per_device_train_batch_size=2,
        max_steps=3,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        bf16=False,  # DPOConfig's default bf16 autocast would round TRL's LM-head pass on CPU
        seed=3407,
    )
    kw.update(overrides)
    return trl.DPOConfig(**kw)


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("reference", ["create_reference_model", "precompute_ref_log_probs"])
def test_dpo_trainer_trains_lora_of_a_4bit_fast_language_model(loaded_4bit, tmp_path, reference):
    model, tok = copy.deepcopy(loaded_4bit[0]), loaded_4bit[1]
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=0)  # B = 0: policy = base
    ref_model = model.create_reference_model() if reference == "create_reference_model" else None
    args = _config(tmp_path, precompute_ref_log_probs=ref_model is None)
    trainer = trl.DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=_pairs(), processing_class=tok)
    before = _trainable(model)
    trainer.train()

    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all(key in h for h in logs for key in REWARDS)
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # log sigmoid(0): policy = reference
    assert logs[0]["rewards/margins"] == 0.0 and logs[-1]["rewards/margins"] != 0.0
    after = _trainable(model)
    assert after.keys() == before.keys() and all(".lora_" in n for n in after)  # the 4-bit base stays frozen
    assert any(not torch.equal(after[n], before[n]) for n in after if n.endswith("lora_B"))
    if ref_model is not None:  # the reference keeps the starting adapter and shares the policy's base weights
        assert all(not layer.lora_B.any() for layer in lora_layers(ref_model.model).values())
        assert ref_model.get_input_embeddings().weight is model.get_input_embeddings().weight
        assert not any(p.requires_grad for p in ref_model.parameters())
    model.eval()  # TRL replaced model.forward; without fused_lm_head it is velotune's forward
    with torch.no_grad():
        assert model(torch.tensor([[5, 60, 700]])).logits.shape == (1, 3, len(tok))


def _transformers_peft(tiny_model_dir, ours) -> torch.nn.Module:
    """transformers' Llama + PEFT LoRA holding velotune's adapter weights."""
    import peft
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=16, target_modules=list(ALL_PROJECTIONS)))
    params = dict(theirs.named_parameters())
    for name, layer in lora_layers(ours.model).items():
        for part in ("lora_A", "lora_B"):
            params[f"base_model.model.{name}.{part}.default.weight"].data.copy_(getattr(layer, part))
    return theirs


@pytest.mark.parametrize("adapter", ["fresh", "continued"])
def test_dpo_trainer_step_equals_transformers_peft(tiny_model_dir, loaded_4bit, tmp_path, adapter):
    """One SGD step with lr 1 and no clipping over all 4 pairs (2 x 2 accumulation): the update is minus the
    gradient. "continued": B != 0 (an adapter from an SFT run), the reference is that adapter on both sides (PEFT:
    TRL's frozen "ref" copy of it)."""
    tok = loaded_4bit[1]
    ours, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir), load_in_4bit=False, dtype=torch.float32)
    ours = FastLanguageModel.get_peft_model(ours, r=8, lora_alpha=16, random_state=0)
    if adapter == "continued":
        torch.manual_seed(1)
        for layer in lora_layers(ours.model).values():
            torch.nn.init.normal_(layer.lora_B, std=0.05)
    theirs = _transformers_peft(tiny_model_dir, ours)
    step = dict(
        max_steps=1,
        gradient_accumulation_steps=2,
        optim="sgd",
        learning_rate=1.0,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
    )
    results = []
    for model, ref_model, out in ((ours, ours.create_reference_model(), "ours"), (theirs, None, "theirs")):
        before = _trainable(model)
        args = _config(tmp_path / out, **step)
        trainer = trl.DPOTrainer(
            model=model, ref_model=ref_model, args=args, train_dataset=_pairs(), processing_class=tok
        )
        trainer.train()
        logged = next(h for h in trainer.state.log_history if "loss" in h)
        results.append((logged, {n: p.detach() - before[n] for n, p in model.named_parameters() if n in before}))
    (ours_log, ours_delta), (peft_log, peft_delta) = results
    if adapter == "continued":
        assert "ref" in theirs.peft_config  # TRL kept a copy of the starting adapter as PEFT's reference

    assert ours_log["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert peft_log["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for key in ("logps/chosen", "logps/rejected"):
        assert ours_log[key] == pytest.approx(peft_log[key], rel=1e-4), key
    moved = 0
    for name in lora_layers(ours.model):
        for part in ("lora_A", "lora_B"):
            mine = ours_delta[f"model.{name}.{part}"]
            torch.testing.assert_close(
                mine, peft_delta[f"base_model.model.{name}.{part}.default.weight"], rtol=1e-4, atol=1e-7
            )
            moved += int(mine.abs().max() > 0)
    assert moved == (28 if adapter == "continued" else 14)  # fresh: B = 0 gives A no gradient, as in PEFT
