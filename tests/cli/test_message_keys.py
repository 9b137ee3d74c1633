"""Advice in messages names keys a user can set: every config key or option an error, warning or printed line of
velotune tells the user to write exists (a message saying `format:` when the key is `dataset_format` does not).

The messages are read from the source with `ast` (f-string values become "{}"), so a new message is checked without
being triggered.
"""

import argparse
import ast
import dataclasses
import re
from pathlib import Path

import velotune
from velotune.cli.main import COMMANDS
from velotune.train.config import KEYS, SECTIONS

PACKAGE = Path(velotune.__file__).parent
FIELDS = {section: {f.name for f in dataclasses.fields(cls)} for section, cls in SECTIONS.items()}
# Names messages mention that are neither config keys nor velotune options, and why.
NOT_KEYS = {
    "key": "the placeholder in 'overrides are written --key value'",
    "your_field": "the placeholder in 'a mapping your_field: canonical_field'",
    "huggingface_hub": "a package: 'needs huggingface_hub: pip install ...'",
    "no-deps": "pip's option",
    "logdir": "tensorboard's option",
}
MESSAGE_CALLS = re.compile(r"Error$|^warn$|^print$|^log$")  # raise XError(...), warnings.warn, print, log(...)

# `data.path`, `train.{}`: internal section.field names, not keys a user can write
SECTION_FIELD = re.compile(r"\b(data|train|lora)\.(\{\}|[a-z_]+)")
# "set X: value", "set X to ...", "use X: value", "raise X to"
ADVICE = re.compile(r"\b(?i:set|use|unset|drop|remove|raise|lower)\s+([a-z][a-z0-9_]*)(?=:\s|\s+to\s)")
# "e.g. eval_steps: 50", "or gradient_checkpointing: false" (a message's leading "subject: ..." is not advice)
YAML_PAIR = re.compile(r"(?<=.)(?<![\w.{/-])([a-z][a-z0-9_]*): (?=true\b|false\b|-?\d|[a-z_]+\b|\{|<)", re.S)
OPTION = re.compile(r"(?<![\w-])--([a-z][a-z0-9_-]*)")


def _options(parser: argparse.ArgumentParser) -> set[str]:
    out = set()
    for action in parser._actions:
        out |= {o[2:] for o in action.option_strings if o.startswith("--")}
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                out |= _options(child)
    return out


def cli_options() -> set[str]:
    """Every --option of every velotune subcommand."""
    parser = argparse.ArgumentParser(prog="velotune")
    sub = parser.add_subparsers()
    for module in COMMANDS.values():
        module.add_parser(sub)
    return _options(parser)


def _text(node: ast.AST) -> str:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    if isinstance(node, ast.BinOp):
        return _text(node.left) + _text(node.right)
    return "{}"


def messages(root: Path = PACKAGE) -> list[tuple[str, str]]:
    """(file:line, text) of every message call in the package."""
    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if MESSAGE_CALLS.search(name):
                where = f"{path.relative_to(root.parent)}:{node.lineno}"
                out.append((where, " ".join(_text(a) for a in node.args)))
    return out


def wrong_names(text: str, options: set[str]) -> list[str]:
    """Names `text` tells the user to write that are not config keys or velotune options."""
    wrong = []
    for m in SECTION_FIELD.finditer(text):
        if m.group(2) == "{}" or m.group(2) in FIELDS[m.group(1)]:
            wrong.append(m.group(0))
    for pattern in (ADVICE, YAML_PAIR):
        for m in pattern.finditer(text):
            word = m.group(1)
            key_like = "_" in word or any(word in names for names in FIELDS.values())
            if key_like and word not in KEYS and word not in NOT_KEYS:
                wrong.append(word)
    for m in OPTION.finditer(text):
        if m.group(1) not in KEYS and m.group(1) not in options and m.group(1) not in NOT_KEYS:
            wrong.append(f"--{m.group(1)}")
    return list(dict.fromkeys(wrong))


def test_messages_name_only_real_config_keys_and_options():
    options = cli_options()
    found = messages()
    assert len(found) > 200  # the scan reads the package's messages
    bad = [f"{where}: {', '.join(wrong)} in {text!r}" for where, text in found if (wrong := wrong_names(text, options))]
    assert not bad, "messages name keys that do not exist:\n" + "\n".join(bad)


def test_the_check_catches_names_that_are_not_keys():
    options = cli_options()
    assert wrong_names("d:7: cannot tell the format. Set format: <name>, or rename fields", options) == ["format"]
    assert wrong_names("set format to the one your data uses", options) == ["format"]
    assert wrong_names("{}: file not found; check data.path", options) == ["data.path"]
    assert wrong_names("data.{} is {}; expected one of: {}", options) == ["data.{}"]
    assert wrong_names("a lower max_seq_len helps", options) == []  # prose, not "key: value" or "set key to"
    assert wrong_names("set max_seq_len: 512 or pass --strategyy fsdp", options) == ["max_seq_len", "--strategyy"]
    assert wrong_names("Set dataset_format: <name>; e.g. field_map: {q: instruction}, --nproc 2", options) == []
