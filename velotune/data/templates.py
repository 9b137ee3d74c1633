"""Chat templates: the tokenizer's own Jinja template, or a built-in one chosen by name.

Built-in templates are written for velotune in the Jinja dialect transformers uses (`apply_chat_template`), so they
render with the same engine as the tokenizer's own. Each names its end-of-turn marker, which generation stops on.
Rendering keeps assistant content verbatim (no trimming, no dropping of <think> blocks), which the masking relies on.
"""

from dataclasses import dataclass

from jinja2 import TemplateError

from velotune.errors import DataError


@dataclass(frozen=True)
class ChatTemplate:
    """A built-in template: its Jinja source and the text that closes an assistant turn."""

    name: str
    source: str
    end_of_turn: str | None  # None: the tokenizer's EOS token
    special_tokens: tuple[str, ...] = ()  # markers the family's tokenizer keeps as single tokens

    def stop_text(self, tokenizer) -> str | None:
        """The text that ends an assistant turn, for stopping generation."""
        return self.end_of_turn if self.end_of_turn is not None else getattr(tokenizer, "eos_token", None)


_LLAMA3 = (
    "{{- '<|begin_of_text|>' -}}"
    "{%- for m in messages -%}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

_CHATML = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# DeepSeek-R1 style: system text first, then <｜User｜>/<｜Assistant｜> markers. Unlike the published template, earlier
# assistant turns keep their <think> block: the model is trained on what it is shown.
_DEEPSEEK_R1 = (
    "{{- '<｜begin▁of▁sentence｜>' -}}"
    "{%- for m in messages if m['role'] == 'system' -%}{{- m['content'] -}}{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}{{- '<｜User｜>' + m['content'] -}}"
    "{%- elif m['role'] == 'assistant' -%}{{- '<｜Assistant｜>' + m['content'] + '<｜end▁of▁sentence｜>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<｜Assistant｜>' -}}{%- endif -%}"
)

# Mistral instruct: no system role, so a system message is prepended to the first user turn.
_MISTRAL = (
    "{{- '<s>' -}}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for m in messages if m['role'] == 'system' -%}{%- set ns.system = m['content'] + '\\n\\n' -%}{%- endfor -%}"
    "{%- set ns.first = true -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}"
    "{{- '[INST]' + (ns.system if ns.first else '') + m['content'] + '[/INST]' -}}{%- set ns.first = false -%}"
    "{%- elif m['role'] == 'assistant' -%}{{- m['content'] + '</s>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# Gemma: roles user and model; no system role, so a system message is prepended to the first user turn.
_GEMMA = (
    "{{- '<bos>' -}}"
    "{%- set ns = namespace(system='', first=true) -%}"
    "{%- for m in messages if m['role'] == 'system' -%}{%- set ns.system = m['content'] + '\\n\\n' -%}{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}"
    "{{- '<start_of_turn>user\\n' + (ns.system if ns.first else '') + m['content'] + '<end_of_turn>\\n' -}}"
    "{%- set ns.first = false -%}"
    "{%- elif m['role'] == 'assistant' -%}{{- '<start_of_turn>model\\n' + m['content'] + '<end_of_turn>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)

# Phi-3 / Phi-3.5: <|system|>, <|user|> and <|assistant|> turns, each closed by <|end|>.
_PHI3 = (
    "{%- for m in messages -%}"
    "{%- if m['role'] in ('system', 'user', 'assistant') -%}"
    "{{- '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)

# Alpaca prompt layout for base models; the tokenizer's EOS closes each response.
_ALPACA = (
    "{%- set ns = namespace(system='Below is an instruction that describes a task. '"
    " + 'Write a response that appropriately completes the request.') -%}"
    "{%- for m in messages if m['role'] == 'system' -%}{%- set ns.system = m['content'] -%}{%- endfor -%}"
    "{{- ns.system + '\\n\\n' -}}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}{{- '### Instruction:\\n' + m['content'] + '\\n\\n' -}}"
    "{%- elif m['role'] == 'assistant' -%}{{- '### Response:\\n' + m['content'] + eos_token + '\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '### Response:\\n' -}}{%- endif -%}"
)

BUILTIN_TEMPLATES: dict[str, ChatTemplate] = {
    "llama-3": ChatTemplate(
        "llama-3",
        _LLAMA3,
        "<|eot_id|>",
        ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    "chatml": ChatTemplate("chatml", _CHATML, "<|im_end|>", ("<|im_start|>", "<|im_end|>")),
    "deepseek-r1": ChatTemplate(
        "deepseek-r1",
        _DEEPSEEK_R1,
        "<｜end▁of▁sentence｜>",
        ("<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"),
    ),
    "mistral": ChatTemplate("mistral", _MISTRAL, "</s>", ("<s>", "</s>", "[INST]", "[/INST]")),
    "gemma": ChatTemplate("gemma", _GEMMA, "<end_of_turn>", ("<bos>", "<start_of_turn>", "<end_of_turn>")),
    "phi-3": ChatTemplate("phi-3", _PHI3, "<|end|>", ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")),
    "alpaca": ChatTemplate("alpaca", _ALPACA, None),  # the tokenizer's own EOS
}

TEMPLATE_ALIASES = {"qwen": "chatml", "llama3": "llama-3", "deepseek": "deepseek-r1", "phi3": "phi-3"}

TEMPLATE_NAMES = sorted(BUILTIN_TEMPLATES) + sorted(TEMPLATE_ALIASES)


def builtin_template(name: str) -> ChatTemplate:
    """The built-in template called `name` (aliases such as qwen -> chatml included)."""
    key = TEMPLATE_ALIASES.get(name, name)
    if key not in BUILTIN_TEMPLATES:
        raise DataError(f"unknown chat template {name!r}; built-in templates are: {', '.join(TEMPLATE_NAMES)}")
    return BUILTIN_TEMPLATES[key]


def resolve_template(tokenizer, name: str | None = None) -> str:
    """The Jinja source to render with: the built-in `name` if given, else the tokenizer's own chat template."""
    if name is not None:
        return builtin_template(name).source
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates; "default" is the chat one
        own = own.get("default")
    if not own:
        raise DataError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__} has no chat template, "
            f"and no chat_template is set; set chat_template to one of: {', '.join(TEMPLATE_NAMES)} "
            f"(or dataset_format: text for plain-text training)"
        )
    return own


def render(
    messages: list[dict],
    tokenizer,
    chat_template: str,
    *,
    add_generation_prompt: bool = False,
    source: str = "conversation",
) -> str:
    """Render a conversation to text with a Jinja chat template (through the tokenizer, for its special tokens)."""
    try:
        text = tokenizer.apply_chat_template(
            messages, chat_template=chat_template, add_generation_prompt=add_generation_prompt, tokenize=False
        )
    except TemplateError as e:
        roles = ", ".join(m["role"] for m in messages)
        raise DataError(
            f"{source}: the chat template cannot render this conversation (roles: {roles}): {e}; fix the row, "
            f"or set chat_template to a built-in template ({', '.join(TEMPLATE_NAMES)})"
        ) from e
    assert isinstance(text, str), f"apply_chat_template returned {type(text).__name__}"
    return text


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """Prepend `system_prompt` when the conversation has no system message of its own."""
    if not system_prompt or any(m["role"] == "system" for m in messages):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def render_prompt(
    messages: list[dict], tokenizer, template: str | None = None, system_prompt: str | None = None
) -> str:
    """The generation prompt for a conversation: rendered up to the point where the assistant's reply starts."""
    chat_template = resolve_template(tokenizer, template)
    return render(with_system_prompt(messages, system_prompt), tokenizer, chat_template, add_generation_prompt=True)
