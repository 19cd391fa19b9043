"""Normalized text: examples, and the round trip over random well-typed trees and texts."""
import ipaddress

import pytest
from hypothesis import given, settings, strategies as st

from bpfwall.lang.checker import analyze
from bpfwall.lang.printer import unparse
from tests.strategies import expressions, spell, trees


@pytest.mark.parametrize("text,normal", [
    ("tcp and udp or not ip", "tcp && udp || !ip"),
    ("(tcp)", "tcp"),
    ("((tcp || udp)) && ip", "(tcp || udp) && ip"),
    ("tcp || (udp || ip)", "tcp || udp || ip"),
    # a comparison under `!` keeps its parentheses: `!` binding looser is not obvious to a reader
    ("!(dst_port == 53)", "!(dst_port == 53)"),
    ("!dst_port == 53", "!(dst_port == 53)"),
    ("not remote_addr in 127.0.0.0/8", "!(remote_addr in 127.0.0.0/8)"),
    ("!!(len < 5)", "!!(len < 5)"),
    ("!tcp && !(dst_port in 1..5) || udp", "!tcp && !(dst_port in 1..5) || udp"),
    ("!(tcp && udp)", "!(tcp && udp)"),
    ("not not tcp", "!!tcp"),
    ("dst_port==0x50", "dst_port == 80"),
    ("dst_port in {0x50,443 , 8000 .. 8100,$p}", "dst_port in {80, 443, 8000..8100, $p}"),
    ("saddr == 0:0:0:0:0:0:0:1", "saddr == ::1"),
    ("saddr in 2001:0db8:0000::/32", "saddr in 2001:db8::/32"),
    ("daddr == ::FFFF:10.0.0.1", f"daddr == {ipaddress.ip_address('::ffff:10.0.0.1')}"),  # form varies by Python
    ("saddr in {10.0.0.0/8, 10.0.0.1, ::1}", "saddr in {10.0.0.0/8, 10.0.0.1, ::1}"),
    ("saddr in 10.0.0.1/32", "saddr in 10.0.0.1/32"),
    ("len>=$min&&len<=$max", "len >= $min && len <= $max"),
    ("true || false", "true || false"),
    ("(dst_port) == (80)", "dst_port == 80"),
    ("local_port in @web", "local_port in @web"),
])
def test_normal_form(text, normal):
    assert analyze(text).text == normal
    assert analyze(normal).text == normal


@settings(max_examples=300)
@given(trees())
def test_round_trip_of_trees(tree):
    text = unparse(tree)
    checked = analyze(text)
    assert checked.text == text
    assert analyze(checked.text).text == text


@settings(max_examples=300)
@given(expressions())
def test_any_spelling_normalizes_idempotently(text):
    once = analyze(text).text
    assert analyze(once).text == once


@settings(max_examples=300)
@given(st.data())
def test_every_spelling_parses_to_the_same_tree(data):
    tree = data.draw(trees())
    assert analyze(data.draw(spell(tree))).text == unparse(tree)
