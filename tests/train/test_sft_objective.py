"""SFT as an objective of the one loop gives the losses of the loop it replaced.

The recorded losses were made by the same 5 steps (tests/distributed/worker.py's tiny LoRA Llama and uneven
examples, batch 2 x accumulation 2, learning rate 1e-2, seed 7, one CPU thread) run at commit d48db50, before the
objective seam; at the seam's commit they came out bit-equal. The tolerance only allows for another CPU's float
rounding.
"""

import torch

from tests.distributed import worker
from velotune.train.config import TrainConfig
from velotune.train.loop import Trainer

BEFORE_THE_SEAM = [
    float.fromhex(h)
    for h in (
        "0x1.364ac68000000p+2",
        "0x1.3604080000000p+2",
        "0x1.367e238000000p+2",
        "0x1.38edd30000000p+2",
        "0x1.37ecf30000000p+2",
    )
]


def test_sft_losses_equal_those_of_the_loop_before_the_objective_seam():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = worker.tiny_model()
        cfg = TrainConfig(
            per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=5, learning_rate=1e-2, seed=7
        )
        losses = Trainer(model, worker.examples(21), cfg, pad_id=0, progress=False).train().losses
    finally:
        torch.set_num_threads(threads)
    for got, want in zip(losses, BEFORE_THE_SEAM, strict=True):
        assert abs(got - want) <= 1e-6 * abs(want), (got, want)
