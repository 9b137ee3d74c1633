"""`velotune train --help` documents every config key: what it does, its choices and its default, read from the
config dataclasses, so the help cannot drift from what a run uses."""

import dataclasses
import re

import pytest
import yaml

from velotune.cli.main import main
from velotune.train.config import ALIASES, KEYS, SECTIONS, run_config_from_dict

KEY_LINE = r"^  --(?P<key>\w+) +(?P<text>.*?)(?:; one of: (?P<choices>[^()]*))? \(default: (?P<default>.*?)\)"


def _help(capsys) -> str:
    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def _keys(text: str) -> dict[str, dict]:
    return {m["key"]: m.groupdict() for m in re.finditer(KEY_LINE, text, re.MULTILINE)}


def _field(key: str) -> dataclasses.Field:
    section, name = KEYS[key]
    return next(f for f in dataclasses.fields(SECTIONS[section]) if f.name == name)


def test_help_lists_every_key_with_a_description(capsys):
    shown = _keys(_help(capsys))
    assert set(shown) == set(KEYS) - set(ALIASES)
    undescribed = [key for key, line in shown.items() if len(line["text"].split()) < 2]
    assert not undescribed, f"keys without a description in --help: {undescribed}"


def test_help_defaults_are_the_dataclass_defaults(capsys):
    """Each default shown, given back as --key value, sets the field's default."""
    for key, line in _keys(_help(capsys)).items():
        f = _field(key)
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if line["default"] == "unset":
            assert default is None, key
            continue
        section, name = KEYS[key]
        cfg = run_config_from_dict({key: yaml.safe_load(line["default"])})
        assert getattr(getattr(cfg, section), name) == default, f"{key}: --help says {line['default']}"


def test_help_choices_are_the_ones_checked(capsys):
    shown = _keys(_help(capsys))
    assert shown["strategy"]["choices"] == "auto, ddp, fsdp" and shown["strategy"]["default"] == "auto"
    assert shown["dataset_format"]["choices"].startswith("auto, alpaca")
    assert shown["lr_scheduler_type"]["choices"] == "cosine, linear, constant"
    for key in ("strategy", "dataset_format", "optim", "too_long"):
        with pytest.raises(Exception, match="choose one of"):
            run_config_from_dict({key: "no-such-choice"})


def test_help_names_the_aliases_and_the_real_strategy_default(capsys):
    text = _help(capsys)
    assert "(also --model)" in text and "(also --r)" in text
    assert "ddp (default)" not in text and "--strategy auto|ddp|fsdp" in text
