"""The man page generator: its roff escaping, and the policy key reference against the schema."""
from __future__ import annotations

from bpfwall.manpage import bpfwall_1, escape
from bpfwall.policy import keys, schema


def test_every_key_the_schema_accepts_is_described_and_no_other():
    assert set(keys.SETTINGS) == set(schema.DEFAULT_KEYS)
    assert set(keys.SETTINGS) | set(keys.UNIT_ONLY) == set(schema.UNIT_KEYS)


def test_escape_keeps_text_literal():
    assert escape(".TH x\n'br") == "\\&.TH x\n\\&'br"  # never a request
    assert escape("a\\b --x") == "a\\eb \\-\\-x"


def test_a_help_text_that_looks_like_roff_stays_text():
    import argparse

    p = argparse.ArgumentParser(prog="bpfwall", description=".SH NOT A HEADING")
    sub = p.add_subparsers()
    sub.add_parser("zap", help="'quoted first").add_argument("--x", help="\\fBbold?")
    page = bpfwall_1(p, "ref", 2)
    assert "\n.SH NOT" not in page and "\\&.SH NOT A HEADING" in page
    assert "\\&'quoted first" in page and "\\efBbold?" in page
