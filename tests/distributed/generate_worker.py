"""Sampled generation from an FSDP2-sharded tiny model on 2 processes with different seeds per rank: the ranks must
still produce the same tokens (rank 0's), or their collectives would fall out of step.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed/generate_worker.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.distributed.worker import tiny_model  # noqa: E402
from velotune.models.generate import generate  # noqa: E402
from velotune.train import distributed as vd  # noqa: E402


def main() -> None:
    env = vd.init_distributed("cpu", "fsdp")
    model = tiny_model().eval()
    vd.shard_decoder(model, env)
    # sampling at a high temperature with a different seed on each rank: only broadcasting keeps them together
    out = generate(model, [5, 6, 7], max_new_tokens=24, temperature=5.0, eos_token_id=[3, 4], seed=env.rank)
    (Path(sys.argv[1]) / f"rank{env.rank}.json").write_text(json.dumps(out))
    vd.shutdown()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
