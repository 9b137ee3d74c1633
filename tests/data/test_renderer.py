"""Renderer: renders exactly what the tokenizer's apply_chat_template renders, by splicing when that is safe."""

import pytest

from velotune.data import BUILTIN_TEMPLATES
from velotune.data.rendering import Renderer, content_is_opaque
from velotune.data.templates import render

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
    [{"role": "user", "content": " spaced \n"}, {"role": "assistant", "content": "😀 naïve"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "{{ not jinja }}"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": ""},
        {"role": "assistant", "content": "<think>x</think>\n\nb"},
    ],
    [{"role": "user", "content": "\ue000" + "0\ue001 placeholder look-alike"}],
]


@pytest.mark.parametrize("name", [None, *BUILTIN_TEMPLATES])
def test_renderer_matches_the_tokenizer_for_every_conversation(tokenizer, name):
    template = BUILTIN_TEMPLATES[name].source if name else tokenizer.chat_template
    renderer = Renderer(tokenizer, template)
    renderer.checks_left = 0  # no reference checks: the fast paths alone must agree
    assert renderer.shapes is not None, "built-in templates and SmolLM2's only copy content"
    for _ in range(3):  # first use builds each shape's skeleton, later ones splice
        for messages in CONVERSATIONS:
            for prompt in (False, True):
                expected = render(messages, tokenizer, template, add_generation_prompt=prompt)
                assert renderer(messages, prompt) == expected


@pytest.mark.parametrize(
    "template",
    [
        "{% for m in messages %}{{ m['content'] | trim }}{% endfor %}",
        "{% for m in messages %}{% if '</think>' in m.content %}T{% endif %}{{ m.content }}{% endfor %}",
        "{% for m in messages %}{% set c = m.content %}{% if c %}{{ c }}{% endif %}{% endfor %}",
        "{% for m in messages %}{% set c %}{{ m.content }}{% endset %}{{ c | upper }}{% endfor %}",
        "{% for m in messages %}{{ m.get('content') }}{% endfor %}",
        "{{ messages | map(attribute='content') | join(',') }}",
        "{% for m in messages %}{{ m | tojson }}{% endfor %}",
        "{% for m in messages %}{{ m.content.split('x')[0] }}{% endfor %}",
    ],
)
def test_templates_that_inspect_content_are_rendered_not_spliced(tokenizer, template):
    assert not content_is_opaque(template)
    renderer = Renderer(tokenizer, template)
    assert renderer.shapes is None
    for messages in CONVERSATIONS:
        assert renderer(messages) == render(messages, tokenizer, template)


def test_templates_that_copy_content_through_variables_are_spliced():
    assert content_is_opaque("{% for m in messages %}{{ m.content ~ '!' }}{% endfor %}")
    assert content_is_opaque(
        "{% set ns = namespace(s='') %}{% for m in messages %}{% set ns.s = ns.s + m['content'] %}{% endfor %}"
        "{{ ns.s if messages else '' }}"
    )


def test_a_wrong_splice_is_caught_and_rendering_falls_back(tokenizer):
    template = tokenizer.chat_template
    renderer = Renderer(tokenizer, template)
    renderer.checks_left = 0
    messages = CONVERSATIONS[0]
    renderer(messages)
    shape = (("user", "assistant"), False)
    renderer.shapes[shape] = [["wrong ", 0], renderer.SHAPE_CHECKS]
    assert renderer(messages) == render(messages, tokenizer, template)
    assert renderer.shapes is None
