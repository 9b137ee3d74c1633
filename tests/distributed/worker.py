"""A few AdamW steps of a tiny LoRA Llama on 1 process or under torchrun (gloo), through velotune.train.distributed
and the Trainer's one accumulation step (SFT, or DPO on preference pairs with --method dpo).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed/worker.py \
        --strategy ddp --out OUT.pt [--save-at 2 --save CKPT.pt] [--resume CKPT.pt] [--method dpo]

Rank 0 writes OUT.pt: {"losses": {step: loss}, "weights": whole LoRA weights, "grad_norms": {step: norm}}.
Every process builds the same model and examples from fixed seeds; each step's global batch is the same on all.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.helpers import velotune_from_hf  # noqa: E402
from velotune.lora.apply import get_peft_model  # noqa: E402
from velotune.train import distributed as vd  # noqa: E402
from velotune.train.config import TrainConfig  # noqa: E402
from velotune.train.loop import Trainer  # noqa: E402
from velotune.train.objectives import DPO, SFT  # noqa: E402

GLOBAL_BATCH, MICRO_BATCH = 8, 2  # per step: 8 examples; 1 process: 4 micro-batches, 2 processes: 2 each


def tiny_model() -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config

    torch.manual_seed(0)
    cfg = tiny_llama_config()
    model = get_peft_model(velotune_from_hf(LlamaForCausalLM(cfg)), r=4, lora_alpha=8)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)  # non-zero B: gradients reach A from step 1
    return model.train()


def examples(n: int) -> list[dict]:
    """Rows of very uneven length (3-40 tokens) and prompt masks, so per-rank token counts differ."""
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 41, (1,), generator=g))
        prompt = int(torch.randint(1, max(2, length // 2), (1,), generator=g))
        ids = torch.randint(3, 128, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def pairs(n: int) -> list[dict]:
    """Preference pairs with prompts and completions of uneven length."""
    g = torch.Generator().manual_seed(3)

    def ids(lo: int, hi: int) -> list[int]:
        return torch.randint(3, 128, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    return [{"prompt_ids": ids(2, 12), "chosen_ids": ids(1, 15), "rejected_ids": ids(1, 15)} for _ in range(n)]


def trainer(model: torch.nn.Module, data: list[dict], par: vd.Parallel, method: str = "sft") -> Trainer:
    """A Trainer whose accumulate() runs the step: micro-batches of MICRO_BATCH on each process."""
    cfg = TrainConfig(per_device_train_batch_size=MICRO_BATCH, max_steps=1)
    objective = DPO(beta=0.5) if method == "dpo" else SFT()
    return Trainer(model, data, cfg, pad_id=0, progress=False, parallel=par, objective=objective)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategy", default=None, choices=vd.STRATEGIES)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--global-batch", type=int, default=GLOBAL_BATCH)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--save-at", type=int, default=0)
    ap.add_argument("--save", type=Path)
    ap.add_argument("--resume", type=Path)
    ap.add_argument("--method", default="sft", choices=("sft", "dpo"))
    args = ap.parse_args()

    env = vd.init_distributed("cpu", args.strategy or "ddp")
    torch.manual_seed(0)
    model = tiny_model()
    par = vd.Parallel(model, env, args.strategy)
    params = [p for p in model.parameters() if p.requires_grad]  # after wrapping: FSDP2's DTensors
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    make = pairs if args.method == "dpo" else examples
    data = make(args.global_batch * args.steps - 3)  # the last step is short: 5 of 8 rows
    loop = trainer(model, data, par, args.method)
    start = 0
    if args.resume:
        ckpt = torch.load(args.resume, weights_only=True)
        vd.load_full_trainable_state(model, ckpt["weights"])
        vd.load_full_optimizer_state(opt, ckpt["optimizer"])
        start = ckpt["step"]
    losses, norms = {}, {}
    for step in range(start + 1, args.steps + 1):
        batch = data[(step - 1) * args.global_batch : step * args.global_batch]
        loss, _ = loop.accumulate(loop.split(batch), step)
        norms[step] = vd.clip_grad_norm(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses[step] = loss
        if step == args.save_at:
            ckpt = {
                "weights": vd.full_trainable_state(model),
                "optimizer": vd.full_optimizer_state(opt),
                "step": step,
            }
            vd.rank0_only(torch.save, ckpt, args.save)
    weights = vd.full_trainable_state(model)
    vd.rank0_only(torch.save, {"losses": losses, "grad_norms": norms, "weights": weights}, args.out)
    vd.shutdown()


if __name__ == "__main__":
    main()
