"""save_pretrained / save_pretrained_merged / save_pretrained_gguf / push_*: files other tools load, the
self-check that refuses an export that does not reproduce the model, and hub errors that write nothing."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from velotune.compat import FastLanguageModel
from velotune.compat import saving as saving_mod
from velotune.compat.export_check import check_merged_stop
from velotune.errors import ConfigError, ExportError
from velotune.lora.apply import lora_layers
from velotune.models.load import load_model


@pytest.fixture(scope="module")
def peaked(tiny_model_dir):
    """A 16-bit tiny model whose next-token distributions are sharp (embeddings x 50), with strong LoRA.

    The random tiny checkpoint predicts almost uniformly, so any export would pass a next-token check; sharp
    predictions make a wrong export visible."""
    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir), load_in_4bit=False, dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(50.0)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=0)
    torch.manual_seed(2)
    for layer in lora_layers(model.model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.3)
    return model, tok


def test_adapter_loads_in_peft_with_the_same_outputs(lora_4bit, tiny_model_dir, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir), load_in_4bit=False, dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16)
    for layer in lora_layers(model.model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.05)
    (tmp_path / "keep.txt").write_text("user file")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "user file"  # saving never clears the directory
    base = LlamaForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    ids = torch.tensor([[5, 60, 700, 42, 9, 11]])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-4)


def test_merged_16bit_loads_in_transformers_and_stops_at_end_of_turn(peaked, tmp_path):
    from transformers import AutoModelForCausalLM, GenerationConfig

    model, tok = peaked
    out = model.save_pretrained_merged(tmp_path / "merged", tok, save_method="merged_16bit")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    theirs = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = torch.tensor([[5, 60, 700, 42, 9, 11]])
    model.eval()
    with torch.no_grad():
        ours_lp = model(ids).logits.log_softmax(-1)
        theirs_lp = theirs(ids).logits.log_softmax(-1)
    assert torch.equal(ours_lp.argmax(-1), theirs_lp.argmax(-1))
    assert GenerationConfig.from_pretrained(str(out)).eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())  # staging removed
    assert model.has_lora  # the training model is untouched by the merge


def test_merged_lora_method_writes_adapter_and_tokenizer(peaked, tmp_path):
    model, tok = peaked
    out = model.save_pretrained_merged(tmp_path, tok, save_method="lora")
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}


def test_export_that_does_not_reproduce_the_model_is_refused(peaked, tmp_path, monkeypatch):
    """An export that lost the adapters (merge skipped) is caught by the next-token check; nothing is kept."""
    model, tok = peaked

    def drop_adapters(lm):
        shadow = copy.deepcopy(lm)
        for name, layer in lora_layers(shadow).items():
            parent, _, leaf = name.rpartition(".")
            setattr(shadow.get_submodule(parent), leaf, layer.base_layer)
        shadow.lora_config = None
        return shadow

    monkeypatch.setattr(saving_mod, "merged_copy", drop_adapters)  # simulate a broken merge (test only)
    with pytest.raises(ExportError, match="does not reproduce the model"):
        model.save_pretrained_merged(tmp_path / "bad", tok)
    assert not (tmp_path / "bad").exists() and not list(tmp_path.iterdir())


def test_stop_token_mismatch_is_an_error(tmp_path, loaded_4bit):
    tok = loaded_4bit[1]
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 0}))
    with pytest.raises(ExportError, match="stops at ids"):
        check_merged_stop(tmp_path, tok.convert_tokens_to_ids("<|im_end|>"), tok)


@pytest.mark.parametrize("save_method", ["merged_4bit", "merged_4bit_forced", "gguf"])
def test_unsupported_save_methods_are_named(peaked, tmp_path, save_method):
    with pytest.raises(ConfigError, match=save_method):
        peaked[0].save_pretrained_merged(tmp_path, peaked[1], save_method=save_method)


def test_gguf_exports_reload_in_velotune_and_come_with_a_modelfile(peaked, tmp_path):
    model, tok = peaked
    files = model.save_pretrained_gguf(tmp_path / "model", tok, quantization_method=["q8_0", "f16", "q4_k_m"])
    assert [f.name for f in files] == ["model.Q8_0.gguf", "model.F16.gguf", "model.Q4_K_M.gguf"]
    modelfile = (tmp_path / "model" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.Q8_0.gguf") and 'PARAMETER stop "<|im_end|>"' in modelfile
    lm, _ = load_model(files[1], torch.float32, with_tokenizer=False)
    ids = torch.tensor([[5, 60, 700, 42, 9, 11]])
    model.eval()
    with torch.no_grad():
        assert torch.equal(lm(ids).logits.argmax(-1), model(ids).logits.argmax(-1))


def test_unknown_gguf_type_fails_before_any_work(peaked, tmp_path):
    with pytest.raises(ConfigError, match="q3_k_s"):
        peaked[0].save_pretrained_gguf(tmp_path / "g", peaked[1], quantization_method=["q8_0", "q3_k_s"])
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("method", ["push_to_hub_merged", "push_to_hub_gguf", "push_to_hub"])
def test_push_without_hub_access_writes_nothing(peaked, tmp_path, monkeypatch, method):
    """No network here (or an invalid token where there is): one ExportError, no files, no upload."""
    pytest.importorskip("huggingface_hub")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
    model, tok = peaked
    args = (tok,) if method != "push_to_hub" else ()
    with pytest.raises(ExportError, match="Nothing was written or uploaded"):
        getattr(model, method)("someone/velotune-test", *args, token="hf_invalid_token_for_tests")
    assert not list(tmp_path.iterdir())
