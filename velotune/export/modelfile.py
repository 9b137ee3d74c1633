"""An Ollama Modelfile beside an exported GGUF: FROM, TEMPLATE, PARAMETER stop lines and SYSTEM.

Ollama renders prompts with Go templates, not the Jinja chat template Hugging Face tokenizers carry, and its own
detection only knows the templates it ships. We recognise the chat style from marker tokens in the Jinja text and
write the equivalent Go template for it (dispatch by dict, first match wins, most specific markers first).
A default system prompt the Jinja template inserts when the conversation has none (SmolLM2, Qwen2.5) becomes the
Modelfile's SYSTEM, which Ollama uses under exactly that condition.

Known differences: the Go templates do not render tool calls, and deepseek-r1's removal of earlier turns'
<think> sections is not reproduced (Go templates have no string split).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from velotune.errors import ExportError


@dataclass(frozen=True)
class ChatStyle:
    """One chat format: marker strings that identify its Jinja template, its Go template and its stop strings."""

    markers: tuple[str, ...]
    template: str
    stops: tuple[str, ...]


_SYSTEM_INTO_FIRST_USER = """\
{{- $system := "" }}
{{- range .Messages }}
{{- if eq .Role "system" }}{{ $system = .Content }}
{{- else if eq .Role "user" }}"""  # styles without a system role fold it into the first user turn

STYLES: dict[str, ChatStyle] = {
    "deepseek-r1": ChatStyle(
        ("<｜User｜>", "<｜Assistant｜>"),
        """\
{{- range .Messages }}{{ if eq .Role "system" }}{{ .Content }}{{ end }}{{ end }}
{{- range .Messages }}
{{- if eq .Role "user" }}<｜User｜>{{ .Content }}
{{- else if eq .Role "assistant" }}<｜Assistant｜>{{ .Content }}<｜end▁of▁sentence｜>
{{- end }}
{{- end }}<｜Assistant｜>{THINK}""",
        ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"),
    ),
    "llama3": ChatStyle(
        ("<|start_header_id|>",),
        """\
{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}<|start_header_id|>assistant<|end_header_id|>

""",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    "gemma": ChatStyle(
        ("<start_of_turn>",),
        _SYSTEM_INTO_FIRST_USER
        + """<start_of_turn>user
{{ if $system }}{{ $system }}

{{ $system = "" }}{{ end }}{{ .Content }}<end_of_turn>
{{ else }}<start_of_turn>model
{{ .Content }}<end_of_turn>
{{ end }}
{{- end }}<start_of_turn>model
""",
        ("<start_of_turn>", "<end_of_turn>"),
    ),
    "mistral": ChatStyle(
        ("[INST]",),
        _SYSTEM_INTO_FIRST_USER
        + """[INST] {{ if $system }}{{ $system }}

{{ $system = "" }}{{ end }}{{ .Content }} [/INST]
{{- else }}{{ .Content }}</s>
{{- end }}
{{- end }}""",
        ("[INST]", "[/INST]", "</s>"),
    ),
    "phi-3": ChatStyle(
        ("<|assistant|>", "<|end|>"),
        """\
{{- range .Messages }}<|{{ .Role }}|>
{{ .Content }}<|end|>
{{ end }}<|assistant|>
""",
        ("<|user|>", "<|assistant|>", "<|end|>"),
    ),
    "chatml": ChatStyle(
        ("<|im_start|>",),
        """\
{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
""",
        ("<|im_start|>", "<|im_end|>"),
    ),
}

_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}]*?)<\|im_end\|>")


def detect_style(chat_template: str) -> str:
    """Name of the STYLES entry whose markers all occur in the Jinja `chat_template`; ExportError if none does."""
    for name, style in STYLES.items():
        if all(m in chat_template for m in style.markers):
            return name
    raise ExportError(
        f"unrecognised chat template (starts {chat_template[:60]!r}); Modelfile templates exist for "
        f"{', '.join(STYLES)}. Pass chat_template=None to let Ollama read the template stored in the GGUF"
    )


def go_template(chat_template: str) -> str:
    """The Ollama Go template equivalent to a Jinja chat template of a known style."""
    name = detect_style(chat_template)
    template = STYLES[name].template
    if name == "deepseek-r1":
        thinks = "<｜Assistant｜><think>" in chat_template
        template = template.replace("{THINK}", "<think>\n" if thinks else "")
    return template


def default_system(chat_template: str) -> str | None:
    """The system prompt a ChatML Jinja template inserts when the conversation has none (SmolLM2, Qwen2.5)."""
    m = _DEFAULT_SYSTEM.search(chat_template)
    return m.group(1).replace("\\n", "\n") if m else None


def _triple_quoted(keyword: str, text: str) -> str:
    if '"""' in text:
        raise ExportError(f'{keyword} text contains """, which a Modelfile cannot quote; remove it')
    return f'{keyword} """{text}"""'


def write_modelfile(gguf_path: Path, chat_template: str | None, stop: list[str], system: str | None = None) -> Path:
    """Write `Modelfile` beside `gguf_path` for `ollama create NAME -f Modelfile`; returns its path.

    TEMPLATE is the Go equivalent of `chat_template` (omitted when None: Ollama then uses the GGUF's own). Stop
    strings are `stop` followed by the chat style's turn markers. SYSTEM is `system`, else the template's default.
    """
    gguf_path = Path(gguf_path)
    lines = [f"FROM ./{gguf_path.name}"]
    stops = list(stop)
    if chat_template is not None:
        lines.append(_triple_quoted("TEMPLATE", go_template(chat_template)))
        stops += STYLES[detect_style(chat_template)].stops
        system = system if system is not None else default_system(chat_template)
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in dict.fromkeys(stops)]
    if system is not None:
        lines.append(_triple_quoted("SYSTEM", system))
    path = gguf_path.parent / "Modelfile"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
