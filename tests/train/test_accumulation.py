"""Gradient accumulation is normalised by target tokens across micro-batches (uneven lengths included)."""

import copy

import torch

from tests.helpers import velotune_from_hf
from velotune.lora.apply import get_peft_model, lora_layers
from velotune.train.config import TrainConfig
from velotune.train.loop import Trainer


def _examples():
    g = torch.Generator().manual_seed(0)
    out = []
    for length, prompt in ((7, 3), (19, 5), (11, 2), (26, 20)):  # very different target counts
        ids = torch.randint(3, 128, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "row": f"r{length}"})
    return out


def _grads(model, examples, batch, accum):
    cfg = TrainConfig(per_device_train_batch_size=batch, gradient_accumulation_steps=accum, max_steps=1)
    trainer = Trainer(model, examples, cfg, pad_id=0, progress=False)
    loss, _ = trainer.accumulate([examples[i : i + batch] for i in range(0, len(examples), batch)])
    return loss, {n: layer.lora_B.grad.clone() for n, layer in lora_layers(model).items()} | {
        n + ".A": layer.lora_A.grad.clone() for n, layer in lora_layers(model).items()
    }


def test_accumulation_4x1_equals_batch_4(tiny_hf_llama):
    model = get_peft_model(velotune_from_hf(tiny_hf_llama), r=4, lora_alpha=8)
    for layer in lora_layers(model).values():  # non-zero B so every gradient is informative
        torch.nn.init.normal_(layer.lora_B, std=0.05)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ex = _examples()
    loss_1, grads_1 = _grads(a, ex, batch=4, accum=1)
    loss_4, grads_4 = _grads(b, ex, batch=1, accum=4)
    assert abs(loss_1 - loss_4) < 1e-5
    for name in grads_1:
        torch.testing.assert_close(grads_4[name], grads_1[name], rtol=1e-4, atol=1e-7)


def test_mean_of_per_batch_means_would_differ(tiny_hf_llama):
    """The naive normalisation (mean per micro-batch, averaged) gives a different loss on this data."""
    model = velotune_from_hf(tiny_hf_llama)
    ex = _examples()
    from velotune.data import collate

    with torch.no_grad():
        per_batch = [float(model(**{k: v for k, v in collate([e], 0).items()}).loss) for e in ex]
        whole = float(model(**collate(ex, 0)).loss)
    assert abs(sum(per_batch) / 4 - whole) > 1e-3
