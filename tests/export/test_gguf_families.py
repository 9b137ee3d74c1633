"""export_gguf for Gemma 2, Gemma 3 (text) and Phi-3, checked against transformers, velotune's GGUF import, gguf-py's
reader and llama.cpp.

Tiny random models (hidden 64, 4 heads / 2 kv heads) with randomised norms, so a norm written without Gemma's +1 or
a fused Phi-3 tensor cut wrongly shows in the logits. Sliding windows are 8 tokens on 24-token inputs, so the
sliding layers really slide. Tolerance: f16 weights measured ~1e-3 relative L2 error against the fp32 model, set
at 5e-3.

Tokenizers: the small byte-level BPE of conftest (gguf_vocab writes BPE tokenizers only; real Gemma tokenizer.json
files are BPE with byte fallback). The Phi-3 one also holds <unk>, <s>, </s> and <|endoftext|>: llama.cpp looks
those up by text when general.name contains "phi3" and fails to load a file whose vocabulary lacks them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from velotune.errors import ExportError
from velotune.export.gguf import export_gguf

from .conftest import CORPUS

TOL = 5e-3
VOCAB = 400
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
GEMMA_SHAPE = dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8)
# (transformers config class, model class, overrides, GGUF arch)
FAMILIES = {
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(num_hidden_layers=2, attn_logit_softcapping=5.0, final_logit_softcapping=3.0, **GEMMA_SHAPE),
        "gemma2",
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(num_hidden_layers=6, **GEMMA_SHAPE),  # layers 0-4 slide, 5 is global
        "gemma3",
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(num_hidden_layers=2, tie_word_embeddings=False), "phi3"),
}


def tokens(n: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(0))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 400-token byte-level BPE holding the special tokens Phi-3 and Gemma vocabularies have."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    out = tmp_path_factory.mktemp("families_tokenizer")
    fast.save_pretrained(out)
    return out


def save_family(out: Path, tokenizer_dir: Path, family: str, **overrides) -> torch.nn.Module:
    """A random transformers model of `family` saved to `out` with the tokenizer; norms randomised around their
    identity (0 for Gemma's 1 + w, 1 for Phi-3)."""
    import transformers

    cfg_name, cls_name, kw, _ = FAMILIES[family]
    cfg = getattr(transformers, cfg_name)(**{**COMMON, **kw, **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(cfg).eval()
    identity = 0.0 if family.startswith("gemma") else 1.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(identity + 0.2 * torch.randn_like(p))
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def exported(request, tokenizer_dir, tmp_path_factory) -> tuple[str, torch.nn.Module, Path, Path]:
    """(family, source model, model dir, f16 GGUF alone in its own directory)."""
    family = request.param
    model_dir = tmp_path_factory.mktemp(f"tiny_{family}")
    model = save_family(model_dir, tokenizer_dir, family)
    path = export_gguf(model_dir, tmp_path_factory.mktemp(f"{family}_gguf") / "model.gguf", progress=False)
    return family, model, model_dir, path


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens()).logits.float()


def test_file_has_every_tensor_and_metadata_key(exported):
    family, model, _, path = exported
    cfg, arch = model.config, FAMILIES[family][3]
    reader = GGUFReader(str(path))
    meta = {k[len(arch) + 1 :]: f.contents() for k, f in reader.fields.items() if k.startswith(arch + ".")}
    assert reader.fields["general.architecture"].contents() == arch
    expected = {
        "context_length": 256,
        "embedding_length": 64,
        "feed_forward_length": 128,
        "block_count": cfg.num_hidden_layers,
        "attention.head_count": 4,
        "attention.head_count_kv": 2,
        "rope.dimension_count": 16,
        "vocab_size": VOCAB,
    }
    if family == "gemma2":
        expected.update({"attention.key_length": 16, "attention.value_length": 16, "attention.sliding_window": 8})
        expected.update({"attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0, "rope.freq_base": 10000.0})
    elif family == "gemma3":
        expected.update({"attention.key_length": 16, "attention.value_length": 16, "attention.sliding_window": 8})
        expected.update({"rope.freq_base": 1_000_000.0, "rope.freq_base_swa": 10000.0})
    for key, value in expected.items():
        assert meta[key] == pytest.approx(value), key
    assert meta["attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == VOCAB

    names = {t.name for t in reader.tensors}
    per_layer = {
        "gemma2": ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "post_attention_norm", "ffn_norm"]
        + ["ffn_gate", "ffn_up", "ffn_down", "post_ffw_norm"],
        "phi3": ["attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down"],
    }
    per_layer["gemma3"] = per_layer["gemma2"] + ["attn_q_norm", "attn_k_norm"]
    want = {f"blk.{i}.{n}.weight" for i in range(cfg.num_hidden_layers) for n in per_layer[family]}
    want |= {"token_embd.weight", "output_norm.weight"} | ({"output.weight"} if family == "phi3" else set())
    assert names == want


def test_norms_carry_gemma_plus_one_and_phi3_keeps_fused_tensors(exported):
    family, model, _, path = exported
    reader = GGUFReader(str(path))
    by_name = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    sd = model.state_dict()
    offset = 1.0 if family.startswith("gemma") else 0.0
    np.testing.assert_allclose(by_name["output_norm.weight"], sd["model.norm.weight"].numpy() + offset, rtol=1e-6)
    np.testing.assert_allclose(
        by_name["blk.1.attn_norm.weight"], sd["model.layers.1.input_layernorm.weight"].numpy() + offset, rtol=1e-6
    )
    if family == "phi3":  # fused rows as saved: q, k, v and gate, up (no q/k permutation)
        qkv = sd["model.layers.0.self_attn.qkv_proj.weight"].numpy()
        np.testing.assert_allclose(by_name["blk.0.attn_qkv.weight"].reshape(qkv.shape), qkv, atol=1e-3)
        gate_up = sd["model.layers.0.mlp.gate_up_proj.weight"].numpy()
        np.testing.assert_allclose(by_name["blk.0.ffn_up.weight"].reshape(gate_up.shape), gate_up, atol=1e-3)
    else:
        q = sd["model.layers.0.self_attn.q_proj.weight"].numpy()
        np.testing.assert_allclose(by_name["blk.0.attn_q.weight"].reshape(q.shape), q, atol=1e-3)


def test_velotune_import_gives_the_original_logits(exported):
    from velotune.models.load import load_model

    _, model, _, path = exported
    again, _ = load_model(path, torch.float32, with_tokenizer=False)
    assert rel_err(logits(again), logits(model)) < TOL


@pytest.mark.parametrize("exported", ["phi3"], indirect=True)
def test_transformers_gguf_loader_gives_the_original_logits(exported):
    """Only Phi-3: transformers' GGUF loader reads no soft-caps and fills query_pre_attn_scalar with its default
    (256) for Gemma, so a Gemma GGUF is not the model it was unless its shape is transformers' default."""
    from transformers import AutoModelForCausalLM

    _, model, _, path = exported
    theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    assert rel_err(logits(theirs), logits(model)) < TOL


@pytest.mark.llamacpp
def test_llama_cpp_gives_the_original_logits(exported):
    pytest.importorskip("llama_cpp", reason="pip install llama-cpp-python")
    from llama_cpp import Llama

    _, model, _, path = exported
    ids = tokens()[0]
    llm = Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False)
    try:
        llm.eval(ids.tolist())
        theirs = torch.tensor(np.array(llm.scores[: len(ids)]))
    finally:
        llm.close()
    assert rel_err(theirs, logits(model)[0]) < TOL


@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m"])
def test_quantized_exports_load_back(exported, quant, tmp_path):
    """The quant mixes run on these layouts (fused attn_qkv gets attn_v's bits); loose check on random weights."""
    from velotune.models.load import load_model

    _, model, model_dir, _ = exported
    path = export_gguf(model_dir, tmp_path / f"{quant}.gguf", quant=quant, progress=False)
    again, _ = load_model(path, torch.float32, with_tokenizer=False)
    assert rel_err(logits(again), logits(model)) < (0.05 if quant == "q8_0" else 0.5)


def test_phi3_longrope_factors_become_tensors(tokenizer_dir, tmp_path):
    """Phi-3 128k-style longrope: short/long factors as rope_factors_* tensors, original context and attention
    factor as keys; velotune's import reads them back into the same model."""
    from gguf import GGUFReader

    from velotune.models.load import load_model

    short = [1.0 + 0.1 * i for i in range(8)]
    long = [2.0 + 0.5 * i for i in range(8)]
    rope = dict(rope_type="longrope", short_factor=short, long_factor=long, rope_theta=10000.0)
    model = save_family(
        tmp_path / "m", tokenizer_dir, "phi3", rope_parameters=rope, original_max_position_embeddings=64
    )
    path = export_gguf(tmp_path / "m", tmp_path / "out" / "model.gguf", progress=False)
    reader = GGUFReader(str(path))
    data = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    np.testing.assert_allclose(data["rope_factors_short.weight"], short, rtol=1e-6)
    np.testing.assert_allclose(data["rope_factors_long.weight"], long, rtol=1e-6)
    assert reader.fields["phi3.rope.scaling.original_context_length"].contents() == 64
    scale = 256 / 64
    attn = reader.fields["phi3.rope.scaling.attn_factor"].contents()
    assert attn == pytest.approx(np.sqrt(1 + np.log(scale) / np.log(64)))
    again, _ = load_model(path, torch.float32, with_tokenizer=False)
    assert rel_err(logits(again), logits(model)) < TOL


def test_gemma_attention_scale_llama_cpp_cannot_store_is_refused(tokenizer_dir, tmp_path):
    save_family(tmp_path / "m", tokenizer_dir, "gemma2", query_pre_attn_scalar=32)
    with pytest.raises(ExportError, match="query_pre_attn_scalar"):
        export_gguf(tmp_path / "m", tmp_path / "model.gguf", progress=False)


def test_unsupported_model_type_lists_the_new_families(tokenizer_dir, tmp_path):
    import json

    save_family(tmp_path / "m", tokenizer_dir, "phi3")
    cfg_path = tmp_path / "m" / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "model_type": "falcon"}))
    with pytest.raises(ExportError, match="gemma2, gemma3_text, .*phi3"):
        export_gguf(tmp_path / "m", tmp_path / "model.gguf", progress=False)
