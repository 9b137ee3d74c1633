"""Memory planner: sizes from model shapes alone (no weights read), each policy ordered as it should be, the
fastest fitting setting per GPU, and `velotune plan` on a model directory holding only config.json.

Peak predictions against measured GPU peaks are checked by bench/bench_planner.py on the GPU, not here.
"""

import argparse
import json
from dataclasses import replace

import pytest

from velotune.errors import ConfigError
from velotune.kernels.cross_entropy import chunk_tokens
from velotune.models.config import ModelConfig
from velotune.train.config import run_config_from_dict
from velotune.train.memory import (
    CUDA_CONTEXT,
    FRAGMENTATION,
    GPUS,
    GiB,
    Setting,
    count_parameters,
    estimate,
    parse_gpu,
    read_model_config,
    recommend,
    relative_cost,
    setting_for,
    trained_matrices,
    usable_bytes,
)

LLAMA_8B = ModelConfig(
    model_type="llama",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
)
HF_8B = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
}


def _weights(e):
    return next(v for k, v in e.parts.items() if k.startswith("weights"))


def test_parameter_count_and_16bit_weights_of_llama_8b():
    assert abs(count_parameters(LLAMA_8B) - 8.03e9) < 0.01e9
    assert abs(_weights(estimate(LLAMA_8B, Setting())) - 2 * count_parameters(LLAMA_8B)) < 1e6


def test_nf4_shrinks_the_decoder_but_not_embeddings():
    bf16, nf4 = (_weights(estimate(LLAMA_8B, Setting(quantization=q))) for q in (None, "nf4"))
    embeddings = 2 * 2 * 128256 * 4096  # embed_tokens + lm_head stay 16-bit
    assert embeddings < nf4 < 0.4 * bf16
    decoder = (bf16 - embeddings) / 2  # parameters
    assert abs((nf4 - embeddings) / decoder - 0.516) < 0.01  # 4 bits + double-quantized absmax per weight


def test_lora_states_are_fp32_value_gradient_and_two_adam_moments():
    lora_params = sum(r * c for r, c, _ in trained_matrices(LLAMA_8B, Setting(lora_r=16)))
    assert lora_params == 41_943_040  # r=16 on all 7 projections of Llama-3-8B (PEFT reports the same)
    e = estimate(LLAMA_8B, Setting(lora_r=16))
    assert e.parts["trained parameters and gradients"] == 8 * lora_params
    assert e.parts["optimizer states (adamw_torch)"] == 8 * lora_params


def test_full_finetuning_optimizer_states_by_optimizer():
    states = {
        o: estimate(LLAMA_8B, Setting(finetuning="full", optim=o)).parts[f"optimizer states ({o})"]
        for o in ("adamw_torch", "adamw_8bit", "adafactor", "sgd")
    }
    n = count_parameters(LLAMA_8B)
    assert abs(states["adamw_torch"] - 4 * n) < 0.01 * n  # two bf16 states
    assert abs(states["adamw_8bit"] - 2.03 * n) < 0.02 * n
    assert states["adafactor"] < 0.01 * n and states["sgd"] == 0


def test_partial_finetuning_trains_top_layers_and_head():
    part = estimate(LLAMA_8B, Setting(finetuning="partial", train_layers=4))
    full = estimate(LLAMA_8B, Setting(finetuning="full"))
    grads = part.parts["optimizer states (adamw_torch)"]
    assert (
        0.1 * full.parts["optimizer states (adamw_torch)"] < grads < 0.3 * full.parts["optimizer states (adamw_torch)"]
    )


def test_checkpointing_policies_order_activation_memory():
    total = {
        p: estimate(LLAMA_8B, Setting(micro_batch=2, seq_len=2048, checkpointing=p)).total
        for p in (None, "checkpoint", "offload")
    }
    assert total["offload"] < total["checkpoint"] < total[None]
    recompute = estimate(LLAMA_8B, Setting(micro_batch=2, seq_len=2048, checkpointing="checkpoint"))
    assert recompute.parts["saved activations (recompute)"] == 32 * 4096 * 4096 * 2  # one input per layer


def test_checkpointing_half_the_layers_keeps_the_other_halfs_activations():
    def saved(p, fraction):
        e = estimate(LLAMA_8B, Setting(micro_batch=2, seq_len=2048, checkpointing=p, checkpoint_layers=fraction))
        return next(v for k, v in e.parts.items() if k.startswith("saved activations"))

    every_layer = saved(None, 1.0) / 32
    assert saved("checkpoint", 0.5) == 16 * 4096 * 4096 * 2 + 16 * every_layer
    assert saved("offload", 0.5) == 4096 * 4096 * 2 + 16 * every_layer
    assert saved("checkpoint", 1.0) < saved("checkpoint", 0.5) < saved(None, 1.0)


def test_gradient_checkpointing_layers_reaches_the_setting_and_is_checked():
    run = run_config_from_dict({"dataset": "x.jsonl", "gradient_checkpointing_layers": 0.5})
    assert setting_for(run, LLAMA_8B).checkpoint_layers == 0.5
    with pytest.raises(ConfigError, match="gradient_checkpointing_layers: 1.5; use a fraction in"):
        run_config_from_dict({"dataset": "x.jsonl", "gradient_checkpointing_layers": 1.5})


def test_memory_grows_with_batch_and_sequence():
    sizes = [estimate(LLAMA_8B, Setting(micro_batch=b, seq_len=s)).total for b, s in ((1, 512), (2, 512), (2, 4096))]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]


def test_packed_batches_take_no_quadratic_mask():
    """Document ids and FlexAttention's block mask, not a [T x T] mask: under 32 MiB at 128K tokens."""
    part = "attention masks (document ids, block mask)"
    masks = [estimate(LLAMA_8B, Setting(seq_len=s, masked=True)).parts[part] for s in (4096, 131072)]
    assert 0 < masks[0] < masks[1] < 32 * 2**20


def test_loss_part_is_the_kernels_logits_buffer():
    """The planner's loss term is the [chunk, V] buffer linear_cross_entropy allocates: at most 512 MiB, so a 256k
    vocabulary (Gemma) takes 1024-token chunks, and small vocabularies keep 4096."""
    assert chunk_tokens(256000, 2) == 1024 and chunk_tokens(49152, 2) == 4096 and chunk_tokens(152064, 2) == 1536
    gemma = replace(LLAMA_8B, vocab_size=256000)
    s = Setting(micro_batch=2, seq_len=2048, checkpointing="offload")
    loss = estimate(gemma, s).parts["peak of: loss / layer backward"]
    assert loss >= 1024 * 256000 * 2 and loss < 4096 * 256000 * 2


def test_recommendation_is_fast_where_memory_is_plenty_and_4bit_where_it_is_not():
    s = Setting(micro_batch=2, seq_len=2048)
    h100 = recommend(LLAMA_8B, s, effective_batch=8, capacity=GPUS["H100"])
    assert h100.setting.quantization is None and h100.setting.checkpointing is None
    assert h100.setting.micro_batch * h100.accumulation >= 8
    t4 = recommend(LLAMA_8B, s, effective_batch=8, capacity=GPUS["T4"])
    assert t4.setting.quantization == "nf4" and t4.estimate.total < GPUS["T4"]
    assert "--load_in_4bit true" in t4.overrides()
    assert recommend(LLAMA_8B, Setting(seq_len=131072), 1, GPUS["T4"]) is None


def test_gpu_names_and_sizes():
    assert parse_gpu("h100") == ("H100", GPUS["H100"])
    assert parse_gpu("A100-80GB")[0] == "A100-80GB"
    assert parse_gpu("24GB") == ("24 GB", 24_000_000_000)
    assert parse_gpu("80GiB")[1] == 80 * GiB
    with pytest.raises(ConfigError, match="one of: T4, RTX4090"):
        parse_gpu("V100")


def test_model_config_is_read_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HF_8B))  # no safetensors at all
    cfg, _ = read_model_config(str(tmp_path))
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_kv_heads) == (4096, 32, 8)


def test_setting_follows_the_run_config(tmp_path):
    run = run_config_from_dict(
        {
            "dataset": "x.jsonl",
            "per_device_train_batch_size": 4,
            "max_seq_length": 1024,
            "gradient_checkpointing": "offload",
            "load_in_4bit": True,
            "lora_r": 8,
        }
    )
    s = setting_for(run, LLAMA_8B)
    assert (s.micro_batch, s.seq_len, s.checkpointing, s.quantization, s.lora_r) == (4, 1024, "offload", "nf4", 8)
    assert s.masked  # batches of several rows are padded


def test_plan_command_reads_only_config_json(tmp_path, capsys):
    from velotune.cli import plan

    (tmp_path / "config.json").write_text(json.dumps(HF_8B))
    parser = argparse.ArgumentParser()
    plan.add_parser(parser.add_subparsers())
    argv = ["plan", str(tmp_path), "--gpu", "T4", "--max_seq_length", "2048", "--per_device_train_batch_size", "2"]
    args, extra = parser.parse_known_args(argv)
    assert extra[0] == str(tmp_path) and args.gpu == "T4"
    assert plan.run(args, extra) == 0
    out = capsys.readouterr().out
    assert "8.03 B parameters" in out and "predicted peak" in out
    assert "T4 (15 GiB" in out and "does NOT fit" in out and "--load_in_4bit true" in out


def test_recommendation_checkpoints_only_the_layers_memory_requires():
    """Between 'everything recomputed' and 'nothing recomputed' the fastest fit recomputes a fraction of layers
    (measured on Gemma-2-9B, H100: 0.3 of layers ran 1.33x the all-layers step within the HF+PEFT anchor's memory)."""
    s = Setting(micro_batch=1, seq_len=4096, checkpointing="offload", quantization="nf4")
    half = estimate(LLAMA_8B, replace(s, checkpoint_layers=0.5)).total
    capacity = int((half + 0.05 * GiB) / FRAGMENTATION) + CUDA_CONTEXT  # room for 0.5 of layers, not for 0.4
    best = recommend(LLAMA_8B, s, effective_batch=1, capacity=capacity)
    assert best.setting.checkpointing is not None and best.setting.checkpoint_layers == 0.5
    assert best.estimate.total <= usable_bytes(capacity)
    assert "--gradient_checkpointing_layers 0.5" in best.overrides() and "0.5 of layers" in best.describe()
    assert relative_cost(replace(s, checkpoint_layers=0.5)) < relative_cost(s)


def test_checkpoint_layers_auto_takes_the_fewest_that_fit(monkeypatch):
    """gradient_checkpointing_layers: auto recomputes the fewest layers whose planned peak fits the GPU it runs on;
    every layer when none fits or without a GPU; a fraction given by the user is kept."""
    from types import SimpleNamespace

    import torch

    from velotune.train.memory import checkpoint_layers_that_fit, resolve_checkpoint_layers

    s = Setting(micro_batch=1, seq_len=4096, checkpointing="offload", quantization="nf4")
    half = estimate(LLAMA_8B, replace(s, checkpoint_layers=0.5)).total
    capacity = int((half + 0.05 * GiB) / FRAGMENTATION) + CUDA_CONTEXT
    assert checkpoint_layers_that_fit(LLAMA_8B, s, capacity) == 0.5
    assert checkpoint_layers_that_fit(LLAMA_8B, s, 4 * GiB) == 1.0

    run = run_config_from_dict(
        {
            "gradient_checkpointing_layers": "auto",
            "gradient_checkpointing": "offload",
            "load_in_4bit": True,
            "max_seq_length": 4096,
            "per_device_train_batch_size": 1,
        }
    )
    assert setting_for(run, LLAMA_8B).checkpoint_layers == 1.0  # plans made before the GPU is known: all layers
    assert resolve_checkpoint_layers(run, LLAMA_8B, torch.device("cpu")) == (1.0, "")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=capacity))
    layers, why = resolve_checkpoint_layers(run, LLAMA_8B, torch.device("cuda"))
    assert layers == 0.5 and "auto: 0.5" in why
    given = run_config_from_dict({"gradient_checkpointing_layers": "0.75"})
    assert resolve_checkpoint_layers(given, LLAMA_8B, torch.device("cuda")) == (0.75, "")


@pytest.mark.parametrize("value", ["fast", 0, 1.5])
def test_checkpoint_layers_refuses_what_is_not_a_fraction_or_auto(value):
    with pytest.raises(ConfigError, match="gradient_checkpointing_layers.*auto"):
        run_config_from_dict({"gradient_checkpointing_layers": value})


def test_dora_keeps_each_projections_output_for_its_magnitude():
    """DoRA's extra saved activations: z [N, out] of q, k, v, o and down (gate and up reuse the fused MLP's
    outputs), per token per layer, in 16-bit, under no checkpointing where every layer keeps them."""
    lora, dora = (estimate(LLAMA_8B, Setting(checkpointing=None, dora=d)) for d in (False, True))
    key = next(k for k in lora.parts if k.startswith("saved activations"))
    per_token_layer = 4096 + 1024 + 1024 + 4096 + 4096  # q, k, v, o, down outputs
    assert dora.parts[key] - lora.parts[key] == 32 * 2048 * per_token_layer * 2
    run = run_config_from_dict({"model_name_or_path": "m", "use_dora": True})
    assert setting_for(run, LLAMA_8B).dora
