"""trl.GRPOTrainer (the TRL route users know) trains a FastLanguageModel's LoRA adapter on a 4-bit base: it samples
through the model's generate() (velotune's engine; TRL passes its own generation_config) and scores completions
through the forward TRL patches in (`add_fused_lm_head`); reward metrics are logged, the adapter moves and the base
stays frozen."""

from __future__ import annotations

import copy

import datasets
import pytest
import torch
import trl

from velotune.compat import FastLanguageModel

pytestmark = [  # TRL 1.16's GRPOConfig defaults gradient_checkpointing=True, which transformers 5.17 renames
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning"),
]


def _prompts() -> datasets.Dataset:
    return datasets.Dataset.from_list(
        [{"prompt": [{"role": "user", "content": f"Count to {i}."}], "answer": str(i)} for i in range(8)]
    )


def shorter(completions, **kwargs):
    return [-len(c[0]["content"]) / 10 for c in completions]


def test_grpo_trainer_trains_lora_of_a_4bit_fast_language_model(loaded_4bit, tmp_path):
    model, tok = copy.deepcopy(loaded_4bit[0]), loaded_4bit[1]
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = trl.GRPOConfig(
        output_dir=str(tmp_path / "grpo"),
        num_generations=4,
        per_device_train_batch_size=4,
        max_completion_length=8,
        max_steps=3,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        bf16=False,
        seed=3407,
        beta=0.0,
    )
    trainer = trl.GRPOTrainer(
        model=model, reward_funcs=[shorter], args=args, train_dataset=_prompts(), processing_class=tok
    )
    trainer.train()

    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    for key in ("reward", "reward_std", "rewards/shorter/mean", "completions/mean_length", "clip_ratio/region_mean"):
        assert all(key in h for h in logs), key
    assert all(h["completions/mean_length"] > 0 for h in logs)
    after = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert after.keys() == before.keys() and all(".lora_" in n for n in after)  # the 4-bit base stays frozen
    assert any(not torch.equal(after[n], before[n]) for n in after if n.endswith("lora_B"))


def test_generate_takes_a_generation_config_argument(loaded_4bit):
    from transformers import GenerationConfig

    model, _ = loaded_4bit
    ids = torch.tensor([[5, 60, 700]])
    config = GenerationConfig(max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0)
    out = model.generate(input_ids=ids, generation_config=config)
    assert out.shape == (1, 6) and torch.equal(out[:, :3], ids)
