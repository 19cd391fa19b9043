"""Every argument and option of every command says what it is for, and `bpfwall help
language` (also at the end of `bpfwall check --help`) describes every field and operator of
the language, with examples the checker accepts."""
from __future__ import annotations

import argparse
import pathlib

import pytest

from bpfwall import cli
from bpfwall.lang import lexer
from bpfwall.lang.checker import analyze
from bpfwall.lang.fields import ALIASES, FIELDS, MEANINGS
from bpfwall.lang.reference import examples, reference

COMMANDS = pathlib.Path(cli.__file__).parent / "commands"


def _parsers(parser: argparse.ArgumentParser, name: str = "bpfwall"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, p in action.choices.items():
                yield from _parsers(p, f"{name} {sub}")


def test_every_argument_and_option_has_a_help_text():
    missing = [f"{name}: {action.dest}" for name, parser in _parsers(cli.build_parser())
               for action in parser._actions
               if not isinstance(action, argparse._SubParsersAction) and not (action.help or "").strip()]
    assert missing == []


def test_load_and_test_say_their_defaults():
    commands = cli.build_parser().commands
    load = {a.dest: a.help for a in commands["load"]._actions}
    assert "a direction left out" in load["ingress"] and "detached" in load["ingress"]
    test = {a.dest: a.help for a in commands["test"]._actions}
    assert "default: ingress" in test["direction"]


def test_shared_options_are_declared_once_and_no_command_reaches_into_cli():
    sources = {p.name: p.read_text() for p in COMMANDS.glob("*.py")}
    for option in ('"--param"', '"--set"', '"--ingress"', '"--mode"', '"--policy-dir"', '"--pin-root"'):
        assert [n for n, text in sources.items() if option in text] == ["options.py"], option
    assert not [n for n, text in sources.items() if "from ..cli import _" in text]


def test_the_reference_names_every_field_and_alias():
    text = reference()
    assert set(MEANINGS) == set(FIELDS) | set(ALIASES)
    for name in [*FIELDS, *ALIASES]:
        assert f"\n  {name} " in text, name


def test_the_reference_names_every_operator():
    text = reference()
    for op in [*lexer.KEYWORDS, *(o for o in lexer._OPERATORS if o not in ",})")]:
        assert op in text, op


@pytest.mark.parametrize("name,example", examples())
def test_every_example_is_valid_and_shows_its_subject(name, example):
    analyze(example)
    if name in MEANINGS:
        assert name in example


def test_help_language_and_check_help_print_the_reference(capsys):
    assert cli.main(["help", "language"]) == 0
    assert capsys.readouterr().out.strip() == reference()
    with pytest.raises(SystemExit) as e:
        cli.main(["check", "--help"])
    assert e.value.code == 0 and reference().splitlines()[-1] in capsys.readouterr().out


def test_help_on_a_command_and_on_nothing(capsys):
    assert cli.main(["help", "load"]) == 0
    assert capsys.readouterr().out.startswith("usage: bpfwall load")
    assert cli.main(["help"]) == 0
    assert capsys.readouterr().out.startswith("usage: bpfwall")
    assert cli.main(["help", "frobnicate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bpfwall: error: help frobnicate: no such command or topic") and err.count("\n") == 1
