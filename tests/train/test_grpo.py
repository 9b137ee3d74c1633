"""The GRPO objective against TRL's `GRPOTrainer._compute_loss` and the formula, on the same tiny Llama, the same
LoRA weights and the same fixed completions and advantages (issue 20).

velotune's side: its decoder with a LoRA adapter, the GRPO objective collating rows (prompt + completion, labels on
the completion) and computing the loss through the chunked log-prob head. TRL's side: transformers'
LlamaForCausalLM + PEFT with the same weights; `_compute_loss` (trl 1.16) is called unbound on a stand-in object
holding the attributes it reads, with per-token log-probs from PEFT's full logits (log_softmax of logits / T at the
completion tokens: what TRL's `_get_per_token_logps_and_entropies` returns), its prompts left-padded and its
completions right-padded as TRL batches them. Loss rtol 1e-5, every LoRA A/B gradient rtol 1e-4, for each loss_type
with and without the KL term, and with old log-probs that differ from the current ones (num_iterations > 1) so the
clipping is exercised.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model as peft_get_peft_model

from tests.train.test_preference_objectives import (
    assert_lora_grads_equal,
    hf_llama,
    ours_from,
    peft_config,
    peft_lora,
    set_lora,
)
from velotune.lora.apply import lora_layers
from velotune.train.objectives.grpo import GRPO, group_advantages, token_losses

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

PAD = 0
GROUP = 3


def rows(seed: int = 0) -> list[dict]:
    """2 prompts x 3 completions of random ids with different prompt and completion lengths, and advantages."""
    gen = torch.Generator().manual_seed(seed)

    def ids(k: int) -> list[int]:
        return torch.randint(2, 128, (k,), generator=gen).tolist()

    prompts = [ids(4), ids(2)]
    lengths = [3, 5, 1, 4, 2, 6]
    advantages = torch.randn(6, generator=gen).tolist()
    out = []
    for i, (n, a) in enumerate(zip(lengths, advantages, strict=True)):
        p, c = prompts[i // GROUP], ids(n)
        out.append({"input_ids": p + c, "labels": [-100] * len(p) + c, "advantage": a, "prompt": p, "completion": c})
    return out


def objective(loss_type: str, beta: float, iterations: int = 1, max_completion_length: int = 8) -> GRPO:
    return GRPO(
        [("r", lambda prompts, completions, **kw: [0.0] * len(completions))],
        None,
        num_generations=GROUP,
        max_completion_length=max_completion_length,
        temperature=0.7,
        beta=beta,
        epsilon=0.2,
        epsilon_high=0.28,
        loss_type=loss_type,
        num_iterations=iterations,
    )


def peft_token_logps(peft_model, examples: list[dict], temperature: float) -> torch.Tensor:
    """TRL's layout: prompts left-padded, completions right-padded; log-probs [B, C] of the completion tokens from
    the full logits / T (0 where padded)."""
    p_len = max(len(e["prompt"]) for e in examples)
    c_len = max(len(e["completion"]) for e in examples)
    ids = torch.full((len(examples), p_len + c_len), PAD)
    att = torch.zeros_like(ids)
    for b, e in enumerate(examples):
        p, c = e["prompt"], e["completion"]
        ids[b, p_len - len(p) : p_len] = torch.tensor(p)
        ids[b, p_len : p_len + len(c)] = torch.tensor(c)
        att[b, p_len - len(p) : p_len + len(c)] = 1
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    logits = peft_model(input_ids=ids, attention_mask=att, position_ids=pos).logits[:, p_len - 1 : -1] / temperature
    logps = F.log_softmax(logits.float(), -1).gather(-1, ids[:, p_len:, None]).squeeze(-1)
    return logps, ids[:, :p_len], att[:, :p_len], ids[:, p_len:], att[:, p_len:]


def trl_loss(peft_model, examples, obj: GRPO, old: torch.Tensor | None, ref: torch.Tensor | None):
    """(TRL's loss, the metrics it logged)."""
    from trl import GRPOTrainer

    logps, prompt_ids, prompt_mask, completion_ids, completion_mask = peft_token_logps(
        peft_model, examples, obj.temperature
    )
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=obj.beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        loss_type=obj.loss_type,
        epsilon_low=obj.epsilon_low,
        epsilon_high=obj.epsilon_high,
        use_vllm=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=obj.max_completion_length,
        accelerator=SimpleNamespace(
            num_processes=1, reduce=lambda t, reduction: t, gather=lambda t: t, gather_for_metrics=lambda t: t
        ),
        aux_loss_enabled=False,
        _entropy_bonus_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
    )
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.tensor([e["advantage"] for e in examples]),
        "num_items_in_batch": completion_mask.sum(),
    }
    if old is not None:
        inputs["old_per_token_logps"] = old
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    return GRPOTrainer._compute_loss(stub, peft_model, inputs), stub._metrics["train"]


def _as_rows(values: torch.Tensor, examples: list[dict]) -> list[list[float]]:
    return [values[b, : len(e["completion"])].tolist() for b, e in enumerate(examples)]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("iterations", [1, 2])
def test_loss_and_lora_gradients_equal_trl(loss_type, beta, iterations):
    torch.manual_seed(0)
    hf = hf_llama()
    ours = ours_from(hf)
    peft_model = peft_get_peft_model(hf_llama(), peft_config())
    set_lora(ours, peft_model, seed=1)
    examples = rows()
    obj = objective(loss_type, beta, iterations)

    with torch.no_grad():  # fixed "old" and reference log-probs, moved away from the current ones
        current = peft_token_logps(peft_model, examples, obj.temperature)[0]
        gen = torch.Generator().manual_seed(5)
        old = current + 0.3 * torch.randn(current.shape, generator=gen) if iterations > 1 else None
        ref = current + 0.2 * torch.randn(current.shape, generator=gen) if beta else None
    for b, e in enumerate(examples):
        if old is not None:
            e["old_logps"] = _as_rows(old, examples)[b]
        if ref is not None:
            e["ref_logps"] = _as_rows(ref, examples)[b]
    mask = peft_token_logps(peft_model, examples, obj.temperature)[4].bool()
    expected, trl_metrics = trl_loss(
        peft_model, examples, obj, old.masked_fill(~mask, 0) if old is not None else None, ref
    )
    expected.backward()

    batch = obj.collate(examples, PAD)
    totals = obj.counts(batch)
    got, metrics = obj.loss(ours, batch, totals)
    got.backward()

    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert_lora_grads_equal(ours, peft_model, rtol=1e-4)
    for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean") + (("kl",) if beta else ()):
        assert metrics[name] / totals["completions"] == pytest.approx(trl_metrics[name][0], rel=1e-5, abs=1e-7), name
    if iterations > 1:
        assert metrics["clip_ratio/region_mean"] > 0  # the old log-probs were moved far enough to clip


def test_formula_by_hand_for_one_completion():
    """One completion of two tokens: the clipped surrogate and the k3 KL estimate, written out."""
    logps = torch.tensor([[-1.0, -2.0]])
    old = torch.tensor([[-1.5, -1.0]])
    ref = torch.tensor([[-1.2, -2.5]])
    adv = torch.tensor([0.7])
    loss, stats = token_losses(logps, old, adv, ref, beta=0.1, epsilon_low=0.2, epsilon_high=0.2)
    r = torch.exp(logps - old)  # [1.65, 0.37]
    surrogate = -torch.min(r * 0.7, r.clamp(0.8, 1.2) * 0.7)
    kl = torch.exp(ref - logps) - (ref - logps) - 1
    torch.testing.assert_close(loss, surrogate + 0.1 * kl)
    assert stats["high"].tolist() == [[1.0, 0.0]] and stats["low"].tolist() == [[0.0, 0.0]]


def test_group_advantages_equal_the_formula_and_trl():
    from trl.trainer.utils import nanstd

    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, 2.0, 2.0, 0.0, float("nan"), 1.0])
    for scale in ("group", "batch", "none"):
        got, zero = group_advantages(rewards, 3, scale)
        grouped = rewards.view(-1, 3)
        mean = torch.nanmean(grouped, 1).repeat_interleave(3)
        std = nanstd(rewards).expand(9) if scale == "batch" else nanstd(grouped, dim=1).repeat_interleave(3)
        expected = rewards - mean
        if scale != "none":
            expected = expected / (std + 1e-4)
        torch.testing.assert_close(got, torch.nan_to_num(expected, nan=0.0))
        assert got[7] == 0.0  # unscorable: no learning signal
    _, zero = group_advantages(rewards, 3, "group")
    assert zero.tolist() == [False] * 3 + [True] * 3 + [False] * 3  # the all-equal group has no signal


def test_masked_truncated_completion_carries_no_loss_and_no_tokens():
    torch.manual_seed(0)
    ours = ours_from(hf_llama())
    for layer in lora_layers(ours).values():
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    examples = rows()
    obj = objective("dapo", 0.0)
    full = obj.collate(examples, PAD)
    masked_examples = [dict(e) for e in examples]
    masked_examples[1]["labels"] = [-100] * len(masked_examples[1]["labels"])  # what mask_truncated does
    masked = obj.collate(masked_examples, PAD)
    assert obj.counts(masked)["completion_tokens"] == obj.counts(full)["completion_tokens"] - 5
    assert obj.counts(masked)["completions"] == 6  # still one of the group (grpo divides by completions)
    loss_masked, _ = obj.loss(ours, masked, obj.counts(masked))
    keep = [e for i, e in enumerate(examples) if i != 1]
    part = obj.collate(keep, PAD)
    loss_rest, _ = obj.loss(ours, part, obj.counts(part))
    torch.testing.assert_close(loss_masked, loss_rest)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_two_micro_batches_under_the_steps_totals_give_the_one_batch_gradients(loss_type):
    torch.manual_seed(0)
    ours = ours_from(hf_llama())
    for layer in lora_layers(ours).values():
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    examples = rows()
    obj = objective(loss_type, 0.04)
    for e in examples:
        e["ref_logps"] = [-3.0] * len(e["completion"])

    def grads() -> list[torch.Tensor]:
        out = [p.grad.clone() for p in ours.parameters() if p.requires_grad]
        ours.zero_grad(set_to_none=True)
        return out

    whole = obj.collate(examples, PAD)
    obj.loss(ours, whole, obj.counts(whole))[0].backward()
    one = grads()
    parts = [obj.collate(examples[:2], PAD), obj.collate(examples[2:], PAD)]
    totals = {k: sum(obj.counts(p)[k] for p in parts) for k in obj.counts(parts[0])}
    for p in parts:
        obj.loss(ours, p, totals)[0].backward()
    for a, b in zip(one, grads(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_peft_names_cover_the_adapter():
    """The comparison above touches every adapter weight (a guard on the helpers)."""
    hf = hf_llama()
    peft_model = peft_get_peft_model(hf_llama(), peft_config())
    ours = ours_from(hf)
    for name in lora_layers(ours):
        assert peft_lora(peft_model, name, "lora_A") is not None


def test_grpo_config_defaults_follow_trl_and_one_group_per_micro_batch():
    from velotune.errors import ConfigError
    from velotune.train.config import run_config_from_dict

    cfg = run_config_from_dict(
        {"method": "grpo", "reward_funcs": "think_format,answer_match", "reward_weights": "1,0.5"}
    )
    t = cfg.train
    assert (t.beta, t.loss_type, t.num_generations, t.per_device_train_batch_size) == (0.0, "dapo", 8, 8)
    assert t.reward_funcs == ["think_format", "answer_match"] and t.reward_weights == [1.0, 0.5]
    assert (
        run_config_from_dict(
            {"method": "grpo", "reward_funcs": "x:y", "num_generations": 4}
        ).train.per_device_train_batch_size
        == 4
    )
    assert (run_config_from_dict({"method": "dpo"}).train.beta, run_config_from_dict({}).train.loss_type) == (
        0.1,
        "sigmoid",
    )
    with pytest.raises(ConfigError, match="method grpo needs reward_funcs"):
        run_config_from_dict({"method": "grpo"})
    with pytest.raises(ConfigError, match="reward_weights has 1 values for 2 reward_funcs"):
        run_config_from_dict({"method": "grpo", "reward_funcs": "a:b,c:d", "reward_weights": "1"})
    with pytest.raises(ConfigError, match="loss_type"):
        run_config_from_dict({"method": "grpo", "reward_funcs": "a:b", "loss_type": "sigmoid"})
