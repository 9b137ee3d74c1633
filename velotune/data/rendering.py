"""Render many conversations with one chat template fast, with exactly the output of `templates.render`.

Rendering through the tokenizer (apply_chat_template) costs more per row than tokenizing a short row; the Renderer
compiles the template once and, when the template only copies message content into its output, renders each
conversation shape once and splices later conversations into it. Both shortcuts are checked against the tokenizer.
"""

import json
import re
from datetime import datetime

from jinja2 import TemplateError, nodes
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from velotune.data.templates import render


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: object, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    """The sandboxed Jinja dialect of Hugging Face chat templates."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _compile(chat_template: str):
    """The template compiled in that dialect; None if it will not compile there."""
    try:
        return _environment().from_string(chat_template)
    except TemplateError:  # e.g. {% generation %} blocks, which only transformers' environment knows
        return None


# Where a template's output may carry message content unchanged: string concatenation, a branch of `a if c else b`.
_PASS_THROUGH = (nodes.Add, nodes.Concat)
# Blocks whose output does not go straight to the rendered text.
_CAPTURING = (nodes.AssignBlock, nodes.FilterBlock, nodes.Macro, nodes.CallBlock)


def _reads_content(node: nodes.Node, names: set[str], attrs: set[tuple[str, str]]) -> bool:
    if isinstance(node, nodes.Getitem):
        return isinstance(node.arg, nodes.Const) and node.arg.value == "content"
    if isinstance(node, nodes.Getattr):
        return node.attr == "content" or (isinstance(node.node, nodes.Name) and (node.node.name, node.attr) in attrs)
    return isinstance(node, nodes.Name) and node.ctx == "load" and node.name in names


def _content_use_ok(path: list[nodes.Node], names: set[str], attrs: set[tuple[str, str]]) -> bool:
    """Whether content read at path[-1] reaches the output unchanged (or is stored in a variable, now tainted)."""
    child = path[-1]
    for depth in range(len(path) - 2, -1, -1):
        parent = path[depth]
        if isinstance(parent, nodes.Output):
            return not any(isinstance(p, _CAPTURING) for p in path[:depth])
        if isinstance(parent, nodes.Assign) and child is parent.node:
            if isinstance(parent.target, nodes.Name):
                names.add(parent.target.name)
            elif isinstance(parent.target, nodes.NSRef):
                attrs.add((parent.target.name, parent.target.attr))
            else:
                return False
            return True
        if not (isinstance(parent, _PASS_THROUGH) or (isinstance(parent, nodes.CondExpr) and child is not parent.test)):
            return False
        child = parent
    return False


def content_is_opaque(chat_template: str) -> bool:
    """Whether the template only ever copies message content into its output, never inspects or transforms it.

    Then rendering a conversation is a fixed text per conversation shape (its roles) with the contents spliced in,
    which Renderer uses. Any use of content in a test, filter, method call or comparison (e.g. `content | trim`,
    `'</think>' in content`) makes the answer no, as does `tojson`, which could escape it.
    """
    if "tojson" in chat_template:
        return False
    try:
        tree = _environment().parse(chat_template)
    except TemplateError:
        return False
    names: set[str] = set()
    attrs: set[tuple[str, str]] = set()
    for _ in range(8):  # until no new variable is found to hold content
        known = (len(names), len(attrs))
        stack: list[tuple[nodes.Node, list[nodes.Node]]] = [(tree, [tree])]
        while stack:
            node, path = stack.pop()
            if isinstance(node, nodes.Const) and node.value == "content":
                parent = path[-2] if len(path) > 1 else None
                if not (isinstance(parent, nodes.Getitem) and parent.arg is node):
                    return False
            if _reads_content(node, names, attrs):
                if not _content_use_ok(path, names, attrs):
                    return False
                continue
            stack.extend((child, [*path, child]) for child in node.iter_child_nodes())
        if (len(names), len(attrs)) == known:
            return True
    return False


_SLOT = re.compile("\ue000(\\d+)\ue001")  # private-use characters: a placeholder no real text contains


class Renderer:
    """Renders conversations with one chat template, exactly as `render` does, several times faster.

    `render` through the tokenizer costs ~3x the template itself per call, and the template itself costs more than
    tokenizing a short row. So: when the template only copies content into its output (`content_is_opaque`), each
    conversation shape (its roles, and whether a generation prompt follows) is rendered once with placeholders and
    later conversations of that shape are spliced into it; otherwise the template is compiled once and rendered
    directly. Every shape's first SHAPE_CHECKS splices are checked against the compiled template, and the first
    CHECKS results against the tokenizer's own rendering; on any difference the renderer falls back for good.
    """

    CHECKS = 8
    SHAPE_CHECKS = 2

    def __init__(self, tokenizer, chat_template: str) -> None:
        self.tokenizer, self.chat_template = tokenizer, chat_template
        self.variables = dict(getattr(tokenizer, "special_tokens_map", {}) or {})
        self.compiled = _compile(chat_template)
        # shape -> [skeleton (literal text and message indices, alternating) or None, checks left]
        self.shapes: dict[tuple, list] | None = {} if self.compiled and content_is_opaque(chat_template) else None
        self.checks_left = self.CHECKS

    def __getstate__(self) -> dict:
        return {**self.__dict__, "compiled": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.compiled = _compile(self.chat_template)

    def _compiled(self, messages: list[dict], add_generation_prompt: bool) -> str | None:
        try:
            return self.compiled.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.variables
            )
        except TemplateError:
            return None

    def _spliced(self, messages: list[dict], add_generation_prompt: bool) -> str | None:
        """The conversation spliced into its shape's skeleton; None when that does not apply."""
        roles = []
        for m in messages:
            if len(m) != 2 or not isinstance(m.get("content"), str):
                return None
            roles.append(m["role"])
        shape = (tuple(roles), add_generation_prompt)
        entry = self.shapes.get(shape)
        if entry is None:
            slots = [{"role": role, "content": f"\ue000{i}\ue001"} for i, role in enumerate(roles)]
            text = self._compiled(slots, add_generation_prompt)
            parts = _SLOT.split(text) if text is not None else None
            skeleton = [p if k % 2 == 0 else int(p) for k, p in enumerate(parts)] if parts is not None else None
            entry = self.shapes[shape] = [skeleton, self.SHAPE_CHECKS]
        skeleton = entry[0]
        if skeleton is None:
            return None
        text = "".join([p if p.__class__ is str else messages[p]["content"] for p in skeleton])
        if entry[1] > 0:
            entry[1] -= 1
            if text != self._compiled(messages, add_generation_prompt):
                self.shapes = None
                return None
        return text

    def __call__(self, messages: list[dict], add_generation_prompt: bool = False, source: str = "conversation") -> str:
        """The conversation rendered to text, exactly as `render` would render it."""
        text = None
        if self.shapes is not None:
            text = self._spliced(messages, add_generation_prompt)
        if text is None and self.compiled is not None:
            text = self._compiled(messages, add_generation_prompt)
        if text is not None and self.checks_left <= 0:
            return text
        self.checks_left -= 1
        reference = render(
            messages, self.tokenizer, self.chat_template, add_generation_prompt=add_generation_prompt, source=source
        )
        if text is not None and text != reference:
            self.compiled = self.shapes = None
        return reference
