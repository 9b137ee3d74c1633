"""export_gguf end to end, checked with independent readers: gguf-py's GGUFReader and transformers' GGUF loader.

Logit tolerances (relative L2 error against the original fp32 model, on 2 x 24 random tokens) were measured on
these random tiny models and set with about 3x headroom: f16 ~5e-4, bf16 ~5e-3, q8_0 ~1.6e-2. Random weights
amplify quantization noise, so the k-quant round trip is checked exactly against the original model with every
weight passed through the file's own quantization, and only loosely (q4_k_m ~0.16) against the original.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from velotune.errors import ExportError
from velotune.export.gguf import QUANT_TYPES, export_gguf
from velotune.export.gguf_quants import QUANTIZERS

from .conftest import save_llama

HF_TO_GGUF = {  # llama.cpp's llama tensor names, written out here independently of gguf-py's table
    "model.embed_tokens.weight": "token_embd.weight",
    "lm_head.weight": "output.weight",
    "model.norm.weight": "output_norm.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in HF_TO_GGUF:
        return HF_TO_GGUF[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{HF_TO_GGUF[rest]}"


def field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


def tokens(n: int = 24) -> torch.Tensor:
    return torch.randint(0, 49152, (2, n), generator=torch.Generator().manual_seed(0))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def gguf_logits(path: Path) -> torch.Tensor:
    """Logits of transformers' model built from the GGUF alone (its directory must hold no config.json)."""
    from transformers import AutoModelForCausalLM

    assert not (path.parent / "config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    with torch.no_grad():
        return model(tokens()).logits


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens()).logits


@pytest.fixture(scope="module")
def tiny_f16(tiny_llama, tmp_path_factory: pytest.TempPathFactory) -> GGUFReader:
    """GGUFReader on the tiny model's f16 export (parsing 49152 tokens takes seconds, so once per module)."""
    return GGUFReader(export_gguf(tiny_llama[1], tmp_path_factory.mktemp("f16") / "m.gguf", "f16", progress=False))


def test_file_has_every_tensor_and_metadata_key(tiny_llama, tiny_f16):
    model, r = tiny_llama[0], tiny_f16
    tensors = {t.name: t for t in r.tensors}
    assert set(tensors) == {gguf_name(n) for n in model.state_dict()}
    for hf_name, w in model.state_dict().items():
        t = tensors[gguf_name(hf_name)]
        assert tuple(int(d) for d in t.shape[::-1]) == tuple(w.shape)  # GGUF lists dims fastest first
        assert t.tensor_type == (T.F32 if w.ndim == 1 else T.F16)
    expected = {
        "general.architecture": "llama",
        "general.file_type": 1,
        "general.quantization_version": 2,
        "llama.context_length": 256,
        "llama.embedding_length": 64,
        "llama.feed_forward_length": 128,
        "llama.block_count": 2,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 16,
        "llama.vocab_size": 49152,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.add_bos_token": False,
    }
    for key, value in expected.items():
        assert field(r, key) == value, key
    assert field(r, "llama.rope.freq_base") == pytest.approx(10000.0)
    assert field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)


def llama_cpp_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF q/k rows in llama.cpp's rotary order: per head, GGUF row 2i is HF row i and 2i + 1 is HF row i + hd/2."""
    hd = w.shape[0] // n_head
    order = [h * hd + (j // 2) + (j % 2) * (hd // 2) for h in range(n_head) for j in range(hd)]
    return w[order]


def test_every_tensor_holds_the_hf_weight_in_llama_cpp_layout(tiny_llama, tiny_f16):
    model = tiny_llama[0]
    data = {t.name: gguf_dequantize(np.asarray(t.data), t.tensor_type) for t in tiny_f16.tensors}
    for hf_name, w in model.state_dict().items():
        if "q_proj" in hf_name or "k_proj" in hf_name:
            w = llama_cpp_rows(w, model.config.num_attention_heads if "q_proj" in hf_name else 2)
        got = torch.from_numpy(data[gguf_name(hf_name)].reshape(w.shape).copy())
        torch.testing.assert_close(got, w, rtol=1e-3, atol=1e-5, msg=hf_name)  # f16 rounding


def test_tokenizer_metadata_matches_the_hf_tokenizer(tiny_llama, tiny_f16):
    from transformers import AutoTokenizer

    hf, r = AutoTokenizer.from_pretrained(tiny_llama[1]), tiny_f16
    vocab = {i: t for t, i in hf.get_vocab().items()}
    assert field(r, "tokenizer.ggml.tokens") == [vocab[i] for i in range(49152)]
    types = field(r, "tokenizer.ggml.token_type")
    special = sorted(i for i, tok in hf.added_tokens_decoder.items() if tok.special)
    assert len(special) == 17 and [i for i, t in enumerate(types) if t == 3] == special  # 3: CONTROL
    assert len(field(r, "tokenizer.ggml.merges")) == len(json.loads(hf.backend_tokenizer.to_str())["model"]["merges"])
    assert field(r, "tokenizer.ggml.bos_token_id") == hf.bos_token_id
    assert field(r, "tokenizer.ggml.eos_token_id") == hf.eos_token_id == hf.convert_tokens_to_ids("<|im_end|>")
    assert field(r, "tokenizer.chat_template") == hf.chat_template


def test_tokenizer_read_back_by_transformers_encodes_like_the_original(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    _, model_dir = tiny_llama
    export_gguf(model_dir, tmp_path / "tok.gguf", "f16", progress=False)
    original = AutoTokenizer.from_pretrained(model_dir)
    from_gguf = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tok.gguf")  # no tokenizer files beside it
    texts = [
        "Hello world! The year 2024 had 366 days.",
        "<|im_start|>user\nWhat's  up?\n\n<|im_end|>\n<|im_start|>assistant\n",
        "ünïcödé — 日本語 🤗 tabs\tand   spaces",
        "def f(x):\n    return x**2  # comment",
    ]
    for text in texts:
        assert from_gguf.encode(text) == original.encode(text), text
    chat = [{"role": "user", "content": "Hi"}]
    assert from_gguf.apply_chat_template(chat, tokenize=False) == original.apply_chat_template(chat, tokenize=False)


@pytest.mark.slow  # transformers parses the 49152-token vocabulary twice per load: ~15 s each on 2 cores
@pytest.mark.parametrize(("quant", "tolerance"), [("f16", 2e-3), ("bf16", 1.5e-2), ("q8_0", 5e-2)])
def test_transformers_loads_the_file_with_the_original_logits(tiny_llama, kquant_llama, quant, tolerance, tmp_path):
    for model, model_dir in (tiny_llama, kquant_llama):
        path = export_gguf(model_dir, tmp_path / model_dir.name / f"{quant}.gguf", quant, progress=False)
        assert rel_err(gguf_logits(path), logits(model)) < tolerance


def fake_quantized(model: torch.nn.Module, path: Path) -> torch.nn.Module:
    """A copy of `model` whose weights went through the quantization each tensor has in the GGUF at `path`."""
    import copy

    types = {t.name: t.tensor_type for t in GGUFReader(path).tensors}
    out = copy.deepcopy(model)
    with torch.no_grad():
        for hf_name, p in out.named_parameters():
            qtype = types[gguf_name("model.embed_tokens.weight" if hf_name == "lm_head.weight" else hf_name)]
            if qtype not in (T.F32, T.F16):
                w = p.detach().numpy()
                p.copy_(torch.from_numpy(gguf_dequantize(QUANTIZERS[qtype].quantize(w), qtype)))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["q4_k_m", "q5_k_m", "q6_k"])
def test_kquant_file_is_the_model_with_its_weights_quantized(kquant_llama, quant, tmp_path):
    model, model_dir = kquant_llama
    path = export_gguf(model_dir, tmp_path / f"{quant}.gguf", quant, progress=False)
    got = gguf_logits(path)
    assert rel_err(got, logits(fake_quantized(model, path))) < 1e-5
    assert rel_err(got, logits(model)) < {"q4_k_m": 0.4, "q5_k_m": 0.2, "q6_k": 0.1}[quant]


def test_q4_k_m_gives_attn_v_and_ffn_down_six_bits_on_more_bits_layers(kquant_llama, tmp_path):
    _, model_dir = kquant_llama
    r = GGUFReader(export_gguf(model_dir, tmp_path / "m.gguf", "q4_k_m", progress=False))
    types = {t.name: t.tensor_type for t in r.tensors}
    assert field(r, "general.file_type") == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert "output.weight" not in types and types["token_embd.weight"] == T.Q6_K  # tied: output's type
    assert types["blk.0.attn_v.weight"] == T.Q4_K and types["blk.1.attn_v.weight"] == T.Q6_K  # more bits: i >= 7n/8
    assert types["blk.0.ffn_down.weight"] == T.Q4_K and types["blk.1.ffn_down.weight"] == T.Q6_K
    assert types["blk.0.attn_norm.weight"] == T.F32 and types["blk.1.ffn_up.weight"] == T.Q4_K


def test_short_rows_fall_back_to_32_value_blocks(tiny_llama, tmp_path):
    model, model_dir = tiny_llama
    r = GGUFReader(export_gguf(model_dir, tmp_path / "m.gguf", "q4_k_m", progress=False))
    tensors = {t.name: t for t in r.tensors}
    assert tensors["blk.0.ffn_up.weight"].tensor_type == T.Q5_0  # 64-wide rows: Q4_K -> Q5_0
    assert tensors["blk.1.attn_v.weight"].tensor_type == T.Q8_0  # Q6_K -> Q8_0
    assert tensors["output.weight"].tensor_type == T.Q8_0
    w = model.state_dict()["model.layers.0.mlp.up_proj.weight"].numpy()
    t = tensors["blk.0.ffn_up.weight"]
    np.testing.assert_array_equal(np.asarray(t.data).reshape(-1), gguf_quantize(w, T.Q5_0).reshape(-1))


def test_sharded_checkpoint_exports_the_same_file(tiny_llama, tmp_path):
    model, model_dir = tiny_llama
    sharded = tmp_path / model_dir.name  # same directory name: general.name matches too
    model.save_pretrained(sharded, max_shard_size="4MB")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(model_dir / f, sharded / f)
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    a = export_gguf(sharded, tmp_path / "a.gguf", "q8_0", progress=False)
    b = export_gguf(model_dir, tmp_path / "b.gguf", "q8_0", progress=False)
    assert a.read_bytes() == b.read_bytes()


def test_worker_processes_write_the_same_bytes(small_bpe_tokenizer_dir, tmp_path):
    model_dir = tmp_path / "hf"
    save_llama(model_dir, small_bpe_tokenizer_dir, vocab_size=512, hidden_size=256, intermediate_size=512)
    one = export_gguf(model_dir, tmp_path / "one.gguf", "q4_k_m", progress=False, workers=1)
    two = export_gguf(model_dir, tmp_path / "two.gguf", "q4_k_m", progress=False, workers=2)
    assert one.read_bytes() == two.read_bytes()


def test_unknown_quant_lists_the_valid_ones(tiny_llama, tmp_path):
    with pytest.raises(ExportError, match="unknown GGUF quant 'q3_k'.*" + ", ".join(QUANT_TYPES)):
        export_gguf(tiny_llama[1], tmp_path / "m.gguf", "q3_k")


def test_unsupported_model_type_says_which_are_supported(tiny_llama, tmp_path):
    cfg = json.loads((tiny_llama[1] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "falcon"}))
    supported = "gemma2, gemma3_text, llama, mistral, phi3, qwen2, qwen3"
    with pytest.raises(ExportError, match=f"no GGUF mapping for model_type 'falcon'; supported: {supported}"):
        export_gguf(tmp_path, tmp_path / "m.gguf", "f16")


def test_insufficient_disk_space_is_detected_before_writing(tiny_llama, tmp_path, monkeypatch):
    import velotune.export.gguf as gguf_export

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(gguf_export.shutil, "disk_usage", lambda _: usage(10**12, 10**12 - 10**6, 10**6))
    with pytest.raises(ExportError, match=r"not enough disk space .* needs about 0\.0[0-9] GiB"):
        export_gguf(tiny_llama[1], tmp_path / "m.gguf", "f16", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_export_leaves_no_file_behind(small_bpe_tokenizer_dir, tmp_path):
    model = save_llama(tmp_path / "src", small_bpe_tokenizer_dir, vocab_size=512)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")  # late tensor: the file is half written
    model.save_pretrained(tmp_path / "src")
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="mlp.down_proj.weight.*NaN"):
        export_gguf(tmp_path / "src", out / "m.gguf", "f16", progress=False)
    assert list(out.iterdir()) == []


def test_llama3_rope_scaling_becomes_rope_freqs(small_bpe_tokenizer_dir, tmp_path):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    save_llama(tmp_path, small_bpe_tokenizer_dir, vocab_size=512, rope_parameters=rope)
    r = GGUFReader(export_gguf(tmp_path, tmp_path / "m.gguf", "f16", progress=False))
    factors = {t.name: np.asarray(t.data) for t in r.tensors}["rope_freqs.weight"]
    cfg = LlamaConfig.from_pretrained(tmp_path)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    base = 1.0 / (500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    np.testing.assert_allclose(factors, (base / scaled).numpy(), rtol=1e-5)  # llama.cpp divides freqs by these
    assert field(r, "llama.rope.freq_base") == pytest.approx(500000.0)


def test_linear_rope_scaling_is_written_as_metadata(small_bpe_tokenizer_dir, tmp_path):
    save_llama(
        tmp_path, small_bpe_tokenizer_dir, vocab_size=512, rope_parameters={"rope_type": "linear", "factor": 4.0}
    )
    r = GGUFReader(export_gguf(tmp_path, tmp_path / "m.gguf", "f16", progress=False))
    assert field(r, "llama.rope.scaling.type") == "linear"
    assert field(r, "llama.rope.scaling.factor") == pytest.approx(4.0)


def test_qwen2_keeps_q_k_rows_and_biases_as_saved(smollm2_tokenizer_dir, tmp_path):
    model = _save_family(
        "Qwen2ForCausalLM",
        "Qwen2Config",
        tmp_path / "hf",
        smollm2_tokenizer_dir,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    r = GGUFReader(export_gguf(tmp_path / "hf", tmp_path / "m.gguf", "f16", progress=False))
    data = {t.name: gguf_dequantize(np.asarray(t.data), t.tensor_type) for t in r.tensors}
    assert field(r, "general.architecture") == "qwen2"
    for hf_name, gname in [("q_proj.weight", "attn_q.weight"), ("k_proj.bias", "attn_k.bias")]:
        w = model.state_dict()[f"model.layers.1.self_attn.{hf_name}"]
        got = torch.from_numpy(data[f"blk.1.{gname}"].reshape(w.shape).copy())
        torch.testing.assert_close(got, w, rtol=1e-3, atol=1e-5)


def _save_family(cls_name: str, cfg_name: str, out: Path, tokenizer_dir: Path, **kw) -> torch.nn.Module:
    import transformers

    cfg = getattr(transformers, cfg_name)(
        vocab_size=49152,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        **kw,
    )
    torch.manual_seed(2)
    model = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_((1 if "norm" in name else 0) + 0.2 * torch.randn_like(p))
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return model


@pytest.mark.slow
@pytest.mark.parametrize(
    ("cls_name", "cfg_name", "arch", "kw"),
    [
        ("MistralForCausalLM", "MistralConfig", "llama", dict(num_attention_heads=4, num_key_value_heads=2)),
        ("Qwen2ForCausalLM", "Qwen2Config", "qwen2", dict(num_attention_heads=4, num_key_value_heads=2)),
        ("Qwen3ForCausalLM", "Qwen3Config", "qwen3", dict(num_attention_heads=2, num_key_value_heads=1, head_dim=128)),
    ],
)
def test_other_families_load_back_in_transformers(smollm2_tokenizer_dir, tmp_path, cls_name, cfg_name, arch, kw):
    model = _save_family(cls_name, cfg_name, tmp_path / "hf", smollm2_tokenizer_dir, **kw)
    path = export_gguf(tmp_path / "hf", tmp_path / "m.gguf", "f16", progress=False)
    assert field(GGUFReader(path), "general.architecture") == arch
    assert rel_err(gguf_logits(path), logits(model)) < 2e-3


def test_sentencepiece_style_tokenizer_becomes_a_llama_vocab(spm_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    save_llama(tmp_path / "hf", spm_tokenizer_dir, vocab_size=512)
    path = export_gguf(tmp_path / "hf", tmp_path / "m.gguf", "f16", progress=False)
    r = GGUFReader(path)
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert field(r, "tokenizer.ggml.model") == "llama"
    assert field(r, "tokenizer.ggml.add_space_prefix") is True
    toks, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    assert [toks[i] for i, t in enumerate(types) if t == 6] == [f"<0x{b:02X}>" for b in range(256)]  # 6: BYTE
    assert [toks[i] for i, t in enumerate(types) if t in (2, 3)] == ["<unk>", "<s>", "</s>"]  # UNKNOWN, CONTROL
    assert toks[500:] == [f"[PAD{i}]" for i in range(500, 512)] and set(types[500:]) == {5}  # 5: UNUSED
    scores = field(r, "tokenizer.ggml.scores")
    merged = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())["model"]["merges"]
    first, second = ("".join(m) for m in merged[:2])
    assert scores[toks.index(first)] > scores[toks.index(second)] > min(scores)  # earlier merge, higher score
    from_gguf = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in ["Beautiful is better than ugly.", "  two  spaces, ünïcode 🤗 and 2024"]:
        assert from_gguf.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)


def test_missing_tokenizer_is_reported_with_the_fix(small_bpe_tokenizer_dir, tmp_path):
    save_llama(tmp_path / "hf", small_bpe_tokenizer_dir, vocab_size=512)
    (tmp_path / "hf" / "tokenizer.json").unlink()
    with pytest.raises(ExportError, match=r"no tokenizer\.json.*tokenizer\.save_pretrained"):
        export_gguf(tmp_path / "hf", tmp_path / "out" / "m.gguf", "f16", progress=False)
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(("factor", "old_ctx"), [(8.0, 8192), (32.0, 64)])
def test_llama3_gguf_imports_with_its_rope_scaling(small_bpe_tokenizer_dir, tmp_path, factor, old_ctx):
    """A Llama 3.1 / 3.2-style GGUF (rope_freqs tensor, no scaling keys) loads with the llama3 rope scaling that
    reproduces it, and velotune's import gives transformers' logits of the source checkpoint past the original
    context."""
    from transformers import AutoModelForCausalLM

    from velotune.models.gguf_import import load_gguf
    from velotune.models.rope import inv_frequencies

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": old_ctx,
    }
    save_llama(tmp_path, small_bpe_tokenizer_dir, vocab_size=512, rope_parameters=rope)
    path = export_gguf(tmp_path, tmp_path / "m.gguf", "f16", progress=False)
    ours = load_gguf(path, torch.float32)
    # GGUF keeps the divisors, not the parameters: with few frequencies several parameter sets give the same ones
    source = dataclasses.replace(ours.config, rope_scaling={k: v for k, v in rope.items() if k != "rope_theta"})
    assert ours.config.rope_scaling["rope_type"] == "llama3"
    torch.testing.assert_close(inv_frequencies(ours.config), inv_frequencies(source), rtol=1e-6, atol=0)
    assert not torch.allclose(
        inv_frequencies(ours.config), inv_frequencies(dataclasses.replace(source, rope_scaling=None))
    )
    ids = torch.randint(0, 512, (1, 200), generator=torch.Generator().manual_seed(0))
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float16).float().eval()  # f16 weights
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-3, atol=1e-3)


def test_rope_freqs_matching_no_llama3_scaling_is_refused():
    from velotune.errors import ConfigError
    from velotune.models.rope import llama3_scaling_from_factors

    with pytest.raises(ConfigError, match="match no llama3 rope scaling"):
        llama3_scaling_from_factors([1.0, 3.0, 1.0, 7.0], 8, 10000.0)
