"""DPO, ORPO and SimPO objectives against TRL's trainers (or the papers' formulas) on the same tiny Llama, the same
LoRA weights and the same pairs (issue 18).

The HF side is transformers' LlamaForCausalLM with a PEFT LoRA (r=4, all projections, random non-zero A and B);
velotune's side is its own decoder built from the same weights with the same adapter values copied in. TRL's
trainers are built with a trivial word-level tokenizer (they need one to start) and called on batches made by their
own collators from the same token ids; velotune's objective collates the same pairs itself.

Compared with TRL directly (loss rtol 1e-4; every LoRA A/B gradient rtol 1e-4; rewards/* and logps/* metrics):
- DPO, loss_type sigmoid / hinge / ipo x beta 0.1 / 0.5: `DPOTrainer.compute_loss` (trl 1.16), for a fresh adapter
  (TRL's reference: adapters disabled; velotune's: `disable_adapters`) and for a continued adapter whose weights
  then moved (TRL's reference: a frozen "ref" copy of the adapter; velotune's: the snapshot taken at setup()).
- ORPO: `trl.experimental.orpo.ORPOTrainer.compute_loss`. TRL's NLL term is the chosen rows' cross-entropy over
  prompt AND completion ("orpo chosen nll loss is computed over the full prompt and response"); velotune's is over
  the completion only. They are the same tokens when every prompt is one token long (the first token is never
  predicted), so the whole loss and its gradients are compared there; with longer prompts only TRL's odds-ratio
  term and rewards are compared, and the NLL term against the completion-only formula over transformers' logits.
- SimPO: `trl.experimental.cpo.CPOTrainer(loss_type="simpo", cpo_alpha=0)`, and the paper's formula.

Compared with the formula over transformers + PEFT logits (log_softmax gathered at the completion tokens, summed
per row; reference = PEFT's `disable_adapter()`):
- DPO sigmoid with label_smoothing (cDPO): TRL 1.16's sigmoid loss ignores label_smoothing (it only enters its
  robust / exo_pair / aot losses), so there is no TRL call to compare with.
- reference log-probs: the base model's, and, for an adapter non-zero at setup, those at setup time (rtol 1e-5).

Accumulation: two micro-batches (1 + 2 pairs, the step's totals passed to each) give the gradients of one batch of
3 pairs (rtol 1e-5), and would not with per-micro-batch normalisers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft import get_peft_model as peft_get_peft_model

from tests.conftest import tiny_llama_config
from tests.helpers import velotune_from_hf
from velotune.lora.apply import ALL_PROJECTIONS, get_peft_model, lora_layers
from velotune.train.objectives.preference import DPO, ORPO, SimPO

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # TRL's call

PAD = 0
REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
LOGP_METRICS = ("logps/chosen", "logps/rejected")


# ---------------------------------------------------------------- models, weights and pairs


def hf_llama():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def peft_config() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=list(ALL_PROJECTIONS), lora_dropout=0.0)


def ours_from(hf) -> torch.nn.Module:
    """velotune's decoder on the HF model's base weights, with a fresh (B = 0) LoRA adapter of the same shape."""
    model = get_peft_model(velotune_from_hf(hf), r=4, lora_alpha=8)
    model.train()
    return model


def peft_lora(peft_model, name: str, part: str) -> torch.nn.Parameter:
    return dict(peft_model.named_parameters())[f"base_model.model.{name}.{part}.default.weight"]


def set_lora(ours, peft_model, seed: int, scale: float = 0.2) -> None:
    """The same random A and B (non-zero) in velotune's adapter and PEFT's "default" adapter."""
    gen = torch.Generator().manual_seed(seed)
    for name, layer in lora_layers(ours).items():
        for part in ("lora_A", "lora_B"):
            value = torch.randn(getattr(layer, part).shape, generator=gen) * scale
            getattr(layer, part).data.copy_(value)
            peft_lora(peft_model, name, part).data.copy_(value)


def pairs(n: int = 3, seed: int = 0, prompt_lengths: tuple[int, ...] = (4, 2, 6)) -> list[dict]:
    """n pairs of random token ids (vocab 128, 0 = pad) with different prompt and completion lengths."""
    gen = torch.Generator().manual_seed(seed)

    def ids(k: int) -> list[int]:
        return torch.randint(2, 128, (k,), generator=gen).tolist()

    lengths = [(5, 2), (2, 6), (3, 3), (4, 1)]
    return [
        {
            "prompt_ids": ids(prompt_lengths[i % len(prompt_lengths)]),
            "chosen_ids": ids(lengths[i % 4][0]),
            "rejected_ids": ids(lengths[i % 4][1]),
        }
        for i in range(n)
    ]


def assert_lora_grads_equal(ours, peft_model, rtol: float = 1e-4) -> None:
    compared = 0
    for name, layer in lora_layers(ours).items():
        for part in ("lora_A", "lora_B"):
            expected = peft_lora(peft_model, name, part).grad
            got = getattr(layer, part).grad
            assert expected is not None and got is not None, f"{name}.{part}: no gradient"
            atol = 1e-5 * float(expected.abs().max())  # fp32 sums in another order: near-zero entries
            torch.testing.assert_close(
                got, expected, rtol=rtol, atol=atol, msg=lambda m, k=f"{name}.{part}": f"{k}: {m}"
            )
            compared += 1
    assert compared == 2 * 7 * 2  # A and B of 7 projections in 2 layers


def our_loss(obj, model, examples: list[dict]) -> tuple[torch.Tensor, dict[str, float]]:
    """velotune's loss of one batch of `examples` and its metrics as means over the pairs (TRL's logging)."""
    batch = obj.collate(examples, PAD)
    totals = {k: max(v, 1) for k, v in obj.counts(batch).items()}
    loss, sums = obj.loss(model, batch, totals)
    return loss, {k: v / totals["pairs"] for k, v in sums.items()}


# ---------------------------------------------------------------- TRL trainers


def word_tokenizer():
    """A word-level tokenizer over "t2".."t127" (ids 2..127), "<pad>" = 0 and "<eos>" = 1: TRL's trainers need one to
    start; the compared batches are token ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{f"t{i}": i for i in range(2, 128)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def text_dataset():
    from datasets import Dataset

    return Dataset.from_list([{"prompt": "t5 t6", "chosen": " t7 t8", "rejected": " t9"}])


def common_args(tmp_path) -> dict:
    return dict(
        output_dir=str(tmp_path),
        report_to=[],
        bf16=False,
        use_cpu=True,
        activation_checkpointing=False,  # TRL's configs default gradient_checkpointing to True
        save_strategy="no",
        disable_tqdm=True,
        per_device_train_batch_size=4,
    )


def dpo_trainer(tmp_path, model, beta: float, loss_type: str, peft: bool):
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(beta=beta, loss_type=loss_type, **common_args(tmp_path))
    return DPOTrainer(
        model=model,
        args=args,
        train_dataset=text_dataset(),
        processing_class=word_tokenizer(),
        peft_config=peft_config() if peft else None,
    )


def paired_features(examples: list[dict]) -> list[dict]:
    """Rows as ORPO's / CPO's tokenize_row writes them: prompt + answer, labels -100 over the prompt."""
    out = []
    for e in examples:
        row = {}
        for side in ("chosen", "rejected"):
            ids = e["prompt_ids"] + e[f"{side}_ids"]
            row[f"{side}_input_ids"] = ids
            row[f"{side}_attention_mask"] = [1] * len(ids)
            row[f"{side}_labels"] = [-100] * len(e["prompt_ids"]) + e[f"{side}_ids"]
        out.append(row)
    return out


# ---------------------------------------------------------------- the formula over transformers' logits


def hf_completion_logps(model, examples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs of each row's completion [2B], completion tokens per row [2B]) from full logits: rows are
    the chosen sequences then the rejected ones, right-padded."""
    rows = [(e["prompt_ids"], e[f"{side}_ids"]) for side in ("chosen", "rejected") for e in examples]
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros_like(ids)
    completion = torch.zeros_like(ids)
    for i, (p, c) in enumerate(rows):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        mask[i, : len(p) + len(c)] = 1
        completion[i, len(p) : len(p) + len(c)] = 1
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # [2B, T-1, V]
    token = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # [2B, T-1]
    keep = completion[:, 1:].bool()
    return (token * keep).sum(-1), keep.sum(-1)


# ---------------------------------------------------------------- DPO


@pytest.mark.parametrize("adapter", ["fresh", "continued"])
@pytest.mark.parametrize(("loss_type", "beta"), [("sigmoid", 0.1), ("sigmoid", 0.5), ("hinge", 0.1), ("ipo", 0.5)])
def test_dpo_loss_gradients_and_rewards_equal_trl(tmp_path, loss_type, beta, adapter):
    hf = hf_llama()
    ours = ours_from(hf)
    obj, doubled = DPO(beta=beta, loss_type=loss_type), DPO(beta=2 * beta, loss_type=loss_type)
    if adapter == "fresh":
        obj.setup(ours)  # B = 0: the reference is the base model, as TRL's adapters-disabled reference
        doubled.setup(ours)
        trainer = dpo_trainer(tmp_path, hf, beta, loss_type, peft=True)
        set_lora(ours, trainer.model, seed=1)
    else:
        peft_model = peft_get_peft_model(hf, peft_config())
        set_lora(ours, peft_model, seed=1)
        obj.setup(ours)  # B != 0: the reference is this adapter, as TRL's frozen "ref" copy of it
        doubled.setup(ours)
        trainer = dpo_trainer(tmp_path, peft_model, beta, loss_type, peft=False)
        assert "ref" in trainer.model.peft_config
        set_lora(ours, trainer.model, seed=2)  # the adapter moved on (as after optimizer steps)
    examples = pairs(3)

    expected = trainer.compute_loss(trainer.model, trainer.data_collator(examples))
    expected.backward()
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    loss, metrics = our_loss(obj, ours, examples)
    loss.backward()

    assert float(expected.detach()) > 1e-3  # hinge not saturated: gradients are compared, not zeros
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-4, atol=0)
    assert_lora_grads_equal(ours, trainer.model)
    for key in REWARD_METRICS + LOGP_METRICS:
        assert metrics[key] == pytest.approx(logged[key], rel=1e-4, abs=1e-6), key
    assert abs(logged["rewards/margins"]) > 1e-3  # the policy is not the reference
    with torch.no_grad():
        assert not torch.allclose(our_loss(doubled, ours, examples)[0], loss, rtol=1e-3)  # beta reaches the loss


def test_dpo_label_smoothing_is_conservative_dpo_over_transformers_logits():
    """cDPO: (1 - eps) * -log sigmoid(z) + eps * -log sigmoid(-z), z = beta * (chosen - rejected log-ratios)."""
    hf = hf_llama()
    ours = ours_from(hf)
    obj, unsmoothed = DPO(beta=0.5, label_smoothing=0.2), DPO(beta=0.5)
    obj.setup(ours)
    unsmoothed.setup(ours)
    peft_model = peft_get_peft_model(hf, peft_config())
    set_lora(ours, peft_model, seed=1)
    examples = pairs(3)
    with torch.no_grad():
        logps, _ = hf_completion_logps(peft_model, examples)
        with peft_model.disable_adapter():
            ref, _ = hf_completion_logps(peft_model, examples)
    chosen, rejected = (logps - ref).chunk(2)
    z = 0.5 * (chosen - rejected)
    expected = (-0.8 * F.logsigmoid(z) - 0.2 * F.logsigmoid(-z)).mean()
    loss, _ = our_loss(obj, ours, examples)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=0)
    assert not torch.allclose(our_loss(unsmoothed, ours, examples)[0], loss, rtol=1e-3)


# ---------------------------------------------------------------- ORPO


def orpo_trainer(tmp_path, model, beta: float):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    args = ORPOConfig(beta=beta, max_length=64, **common_args(tmp_path))
    return ORPOTrainer(
        model=model,
        args=args,
        train_dataset=text_dataset(),
        processing_class=word_tokenizer(),
        peft_config=peft_config(),
    )


def test_orpo_loss_and_gradients_equal_trl_and_the_completion_nll(tmp_path):
    hf = hf_llama()
    ours = ours_from(hf)
    trainer = orpo_trainer(tmp_path, hf, beta=0.5)
    set_lora(ours, trainer.model, seed=1)
    obj = ORPO(beta=0.5)
    obj.setup(ours)

    # one-token prompts: TRL's prompt+completion NLL and velotune's completion NLL cover the same tokens
    short = pairs(3, seed=4, prompt_lengths=(1,))
    expected = trainer.compute_loss(trainer.model, trainer.data_collator(paired_features(short)))
    expected.backward()
    loss, metrics = our_loss(obj, ours, short)
    loss.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-4, atol=0)
    assert_lora_grads_equal(ours, trainer.model)
    logged = {k: v[-1] for k, v in trainer._stored_metrics["train"].items()}
    for key in REWARD_METRICS + ("nll_loss", "log_odds_ratio"):
        assert metrics[key] == pytest.approx(logged[key], rel=1e-4, abs=1e-6), key
    other, _ = our_loss(ORPO(beta=1.0), ours, short)
    assert not torch.allclose(other, loss, rtol=1e-3)

    # longer prompts: TRL's odds-ratio term; the NLL term from the formula (completion tokens only)
    examples = pairs(3)
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, trainer.data_collator(paired_features(examples)))
        logged = {k: v[-1] for k, v in trainer._stored_metrics["train"].items()}
        loss, metrics = our_loss(obj, ours, examples)
        logps, n = hf_completion_logps(trainer.model, examples)
    odds_term = loss - metrics["nll_loss"]
    torch.testing.assert_close(odds_term, trl_loss - logged["nll_loss"], rtol=1e-4, atol=0)
    for key in REWARD_METRICS + ("log_odds_ratio",):
        assert metrics[key] == pytest.approx(logged[key], rel=1e-4, abs=1e-6), key
    nll = -logps.chunk(2)[0].sum() / n.chunk(2)[0].sum()
    assert metrics["nll_loss"] == pytest.approx(float(nll), rel=1e-4)
    assert abs(metrics["nll_loss"] - logged["nll_loss"]) > 1e-3  # TRL's NLL also covers the prompt here


# ---------------------------------------------------------------- SimPO


def test_simpo_loss_and_gradients_equal_trl_cpo_simpo_and_the_formula(tmp_path):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    beta, gamma, eps = 2.0, 0.5, 0.1
    hf = hf_llama()
    ours = ours_from(hf)
    args = CPOConfig(
        beta=beta,
        loss_type="simpo",
        cpo_alpha=0.0,
        simpo_gamma=gamma,
        label_smoothing=eps,
        max_length=64,
        **common_args(tmp_path),
    )
    trainer = CPOTrainer(
        model=hf, args=args, train_dataset=text_dataset(), processing_class=word_tokenizer(), peft_config=peft_config()
    )
    set_lora(ours, trainer.model, seed=1)
    obj = SimPO(beta=beta, simpo_gamma=gamma, label_smoothing=eps)
    obj.setup(ours)
    examples = pairs(3)

    expected = trainer.compute_loss(trainer.model, trainer.data_collator(paired_features(examples)))
    expected.backward()
    logged = {k: v[-1] for k, v in trainer._stored_metrics["train"].items()}
    loss, metrics = our_loss(obj, ours, examples)
    loss.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-4, atol=0)
    assert_lora_grads_equal(ours, trainer.model)
    for key in REWARD_METRICS:
        assert metrics[key] == pytest.approx(logged[key], rel=1e-4, abs=1e-6), key

    with torch.no_grad():  # the paper: -log sigmoid(beta * (avg chosen - avg rejected) - gamma), smoothed as TRL's
        logps, n = hf_completion_logps(trainer.model, examples)
    chosen, rejected = (logps / n).chunk(2)
    z = beta * (chosen - rejected) - gamma
    formula = (-(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)).mean()
    torch.testing.assert_close(loss.detach(), formula, rtol=1e-4, atol=0)
    other, _ = our_loss(SimPO(beta=beta, simpo_gamma=2 * gamma, label_smoothing=eps), ours, examples)
    assert not torch.allclose(other, loss, rtol=1e-3)


@pytest.mark.parametrize("make", [lambda: ORPO(beta=0.5), lambda: SimPO()], ids=["orpo", "simpo"])
def test_reference_free_objectives_log_length_averaged_logps_like_trl(tiny_hf_llama, make):
    model = ours_from(tiny_hf_llama)
    obj = make()
    obj.setup(model)
    examples = pairs(3)
    with torch.no_grad():
        logps, n = hf_completion_logps(tiny_hf_llama, examples)
        _, metrics = our_loss(obj, model, examples)
    chosen, rejected = (logps / n).chunk(2)  # TRL: policy_chosen_logps with average_log_prob=True
    assert metrics["logps/chosen"] == pytest.approx(float(chosen.mean()), rel=1e-4)
    assert metrics["logps/rejected"] == pytest.approx(float(rejected.mean()), rel=1e-4)


# ---------------------------------------------------------------- accumulation and the reference


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize(
    "make", [lambda: DPO(beta=0.5), lambda: ORPO(beta=0.5), lambda: SimPO()], ids=["dpo", "orpo", "simpo"]
)
def test_two_micro_batches_under_the_steps_totals_give_the_one_batch_gradients(tiny_hf_llama, make):
    model = ours_from(tiny_hf_llama)
    obj = make()
    obj.setup(model)
    gen = torch.Generator().manual_seed(1)
    for layer in lora_layers(model).values():  # after setup: a fresh adapter that has trained a little
        layer.lora_B.data.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.2)
    examples = pairs(3)
    whole = obj.collate(examples, PAD)
    obj.loss(model, whole, {k: max(v, 1) for k, v in obj.counts(whole).items()})[0].backward()
    expected = _grads(model)

    def accumulate(per_micro_batch_totals: bool) -> list[torch.Tensor]:
        model.zero_grad()
        micro = [obj.collate(examples[:1], PAD), obj.collate(examples[1:], PAD)]
        totals: dict[str, int] = {}
        for b in micro:
            for k, v in obj.counts(b).items():
                totals[k] = totals.get(k, 0) + v
        for b in micro:
            own = {k: max(v, 1) for k, v in obj.counts(b).items()}
            obj.loss(model, b, own if per_micro_batch_totals else totals)[0].backward()
        return _grads(model)

    for got, want in zip(accumulate(False), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    wrong = accumulate(True)  # a mean per micro-batch weights the lone pair twice: the test can tell
    assert not all(torch.allclose(g, w, rtol=1e-3) for g, w in zip(wrong, expected, strict=True))


def test_fresh_adapter_reference_is_the_base_model(tiny_hf_llama):
    examples = pairs(3)
    with torch.no_grad():
        base, _ = hf_completion_logps(tiny_hf_llama, examples)
    model = ours_from(tiny_hf_llama)
    obj = DPO()
    obj.setup(model)
    gen = torch.Generator().manual_seed(1)
    for layer in lora_layers(model).values():  # the adapter trains on after setup
        layer.lora_B.data.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.2)
    batch = obj.collate(examples, PAD)
    torch.testing.assert_close(obj.reference_logps(batch), base, rtol=1e-5, atol=1e-5)
    policy, _ = obj.policy_logps(model, batch)
    assert not torch.allclose(policy.detach(), base, rtol=1e-3)


def test_continued_adapter_reference_stays_the_setup_weights_after_an_optimizer_step(tiny_hf_llama):
    model = ours_from(tiny_hf_llama)
    gen = torch.Generator().manual_seed(1)
    for layer in lora_layers(model).values():  # an adapter from an SFT run: non-zero before setup
        layer.lora_B.data.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.2)
    obj = DPO(beta=0.5)
    obj.setup(model)
    examples = pairs(3)
    batch = obj.collate(examples, PAD)
    with torch.no_grad():
        at_setup, _ = obj.policy_logps(model, batch)

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    obj.loss(model, batch, {"pairs": 3})[0].backward()
    optimizer.step()
    with torch.no_grad():
        after, _ = obj.policy_logps(model, batch)
    assert not torch.allclose(after, at_setup, rtol=1e-3)  # the step moved the policy

    torch.testing.assert_close(obj.reference_logps(batch), at_setup, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the trained weights are back after the reference pass
        torch.testing.assert_close(obj.policy_logps(model, batch)[0], after, rtol=0, atol=0)
