"""Ollama Modelfiles: the Go TEMPLATE renders conversations as the tokenizer's Jinja chat template does.

There is no Go here, so `render_go` below is a small independent evaluator of the template subset the range-only
styles use ({{- / -}} trimming, range .Messages, .Role, .Content); Jinja renders through jinja2 itself.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jinja2
import pytest

from velotune.errors import ExportError
from velotune.export.modelfile import STYLES, detect_style, write_modelfile

SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CONVERSATION = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3 + 3?"},
]


def render_go(template: str, messages: list[dict[str, str]]) -> str:
    """Go text/template semantics for templates made of text, {{ range .Messages }}..{{ end }}, .Role, .Content."""
    template = re.sub(r"\s*\{\{-", "{{", template)  # {{- trims whitespace before the action
    template = re.sub(r"-\}\}\s*", "}}", template)
    loop = re.fullmatch(r"(.*?)\{\{ ?range \.Messages ?\}\}(.*?)\{\{ ?end ?\}\}(.*)", template, re.S)
    head, body, tail = loop.groups()
    out = head
    for m in messages:
        out += body.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"])
    return out + tail


def modelfile(path: Path) -> tuple[dict[str, str], list[str]]:
    """(FROM/TEMPLATE/SYSTEM values, stop values) of a Modelfile."""
    text = path.read_text()
    values: dict[str, str] = {}
    for key, quoted, bare in re.findall(r'^(FROM|TEMPLATE|SYSTEM) (?:"""(.*?)"""|(\S+))$', text, re.S | re.M):
        values[key] = quoted or bare
    stops = [json.loads(s) for s in re.findall(r'^PARAMETER stop (".*")$', text, re.M)]
    return values, stops


@pytest.fixture
def smollm2_template(smollm2_tokenizer_dir: Path) -> str:
    return (smollm2_tokenizer_dir / "chat_template.jinja").read_text()


def jinja(template: str, messages: list[dict[str, str]]) -> str:
    return jinja2.Template(template).render(messages=messages, add_generation_prompt=True)


def test_smollm2_modelfile_has_chatml_template_stops_and_default_system(smollm2_template, tmp_path):
    path = write_modelfile(tmp_path / "smol.gguf", smollm2_template, stop=["<|im_end|>"])
    assert path == tmp_path / "Modelfile"
    values, stops = modelfile(path)
    assert values["FROM"] == "./smol.gguf"
    assert stops == ["<|im_end|>", "<|im_start|>"]
    assert values["SYSTEM"] == SMOLLM2_SYSTEM


def test_smollm2_go_template_renders_like_the_jinja_template(smollm2_template, tmp_path):
    values, _ = modelfile(write_modelfile(tmp_path / "m.gguf", smollm2_template, stop=[]))
    with_system = [{"role": "system", "content": "Be brief."}, *CONVERSATION]
    assert render_go(values["TEMPLATE"], with_system) == jinja(smollm2_template, with_system)
    # without a system turn Jinja adds SmolLM2's default; Ollama adds the Modelfile's SYSTEM as a first message
    ollama_messages = [{"role": "system", "content": values["SYSTEM"]}, *CONVERSATION]
    assert render_go(values["TEMPLATE"], ollama_messages) == jinja(smollm2_template, CONVERSATION)


LLAMA3_JINJA = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def test_llama3_go_template_renders_like_the_jinja_template(tmp_path):
    values, stops = modelfile(write_modelfile(tmp_path / "m.gguf", LLAMA3_JINJA, stop=[]))
    messages = [{"role": "system", "content": "Be brief."}, *CONVERSATION]
    rendered = jinja2.Template(LLAMA3_JINJA).render(messages=messages, add_generation_prompt=True, bos_token="")
    assert render_go(values["TEMPLATE"], messages) == rendered  # llama.cpp adds BOS itself
    assert stops == ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.mark.parametrize(
    ("snippet", "style"),
    [
        ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}{% endfor %}", "gemma"),
        ("{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}", "mistral"),
        ("{{'<｜User｜>' + content}}{{'<｜Assistant｜><think>\\n'}}", "deepseek-r1"),
        ("<|im_start|>system\nYou are Qwen.<|im_end|>", "chatml"),
        ("<|start_header_id|>{{ role }}<|end_header_id|>", "llama3"),
    ],
)
def test_chat_style_is_detected_from_the_jinja_text(snippet, style, tmp_path):
    assert detect_style(snippet) == style
    _, stops = modelfile(write_modelfile(tmp_path / "m.gguf", snippet, stop=["</s>"]))
    assert stops[0] == "</s>" and set(STYLES[style].stops) <= set(stops) and len(stops) == len(set(stops))


def test_deepseek_r1_generation_prompt_opens_a_think_block(tmp_path):
    values, _ = modelfile(write_modelfile(tmp_path / "m.gguf", "<｜User｜>{{c}}<｜Assistant｜><think>\n", stop=[]))
    assert values["TEMPLATE"].endswith("<｜Assistant｜><think>\n")


def test_given_system_replaces_the_templates_default(smollm2_template, tmp_path):
    values, _ = modelfile(write_modelfile(tmp_path / "m.gguf", smollm2_template, stop=[], system="Talk like a pirate."))
    assert values["SYSTEM"] == "Talk like a pirate."


def test_no_chat_template_leaves_the_template_to_the_gguf(tmp_path):
    values, stops = modelfile(write_modelfile(tmp_path / "m.gguf", None, stop=['say "stop"']))
    assert "TEMPLATE" not in values and "SYSTEM" not in values
    assert stops == ['say "stop"']


def test_unknown_chat_template_is_refused_with_the_known_styles(tmp_path):
    with pytest.raises(ExportError, match="unrecognised chat template.*chatml.*chat_template=None"):
        write_modelfile(tmp_path / "m.gguf", "{% for m in messages %}### {{ m.role }}: {{ m.content }}{% endfor %}", [])


def test_phi3_go_template_renders_like_the_builtin_jinja_template(tmp_path):
    from velotune.data.templates import BUILTIN_TEMPLATES

    source = BUILTIN_TEMPLATES["phi-3"].source
    values, stops = modelfile(write_modelfile(tmp_path / "m.gguf", source, stop=["<|end|>"]))
    messages = [{"role": "system", "content": "Be brief."}, *CONVERSATION]
    assert render_go(values["TEMPLATE"], messages) == jinja(source, messages)
    assert detect_style(source) == "phi-3" and "<|end|>" in stops
