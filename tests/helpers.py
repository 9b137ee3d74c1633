"""Test helpers: velotune models built from transformers models on the same weights."""

from __future__ import annotations

import torch

from velotune.models.families import family_for
from velotune.models.load import build_empty, load_weights


def velotune_from_hf(hf_model, dtype=torch.float32):
    cfg = family_for(hf_model.config.model_type).from_hf(hf_model.config.to_dict())
    model = build_empty(cfg)
    load_weights(model, hf_model.state_dict().items(), "hf", dtype)
    return model.eval()
