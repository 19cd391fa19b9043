"""Constant folding of expressions: what is true or false for every packet, never more."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpfwall.lang.checker import analyze
from bpfwall.lang.constant import constant, never_passes
from bpfwall.lang.evaluator import evaluate
from bpfwall.lang.packet import parse_packet
from tests.unit import packets as pk


@pytest.mark.parametrize("text, value", [
    ("false", False), ("true", True), ("!true", False), ("!!false", False), ("tcp && false", False),
    ("false || !true", False), ("tcp || true", True), ("tcp", None), ("tcp && udp", None),
    ("!(false || tcp)", None), ("!(true || tcp)", False), ("false || tcp", None),
])
def test_constant(text, value):
    assert constant(analyze(text).expr) is value
    assert never_passes(analyze(text).expr) is (value is False)


PACKETS = [parse_packet(p) for p in (
    pk.ipv4("10.0.0.1", "192.168.1.1", pk.UDP, pk.udp(5353, 53)),
    pk.ipv6("2001:db8::1", "fe80::1", pk.TCP, pk.tcp(40000, 443)),
    pk.ipv4("10.0.0.1", "10.0.0.2", pk.ICMP, pk.icmp(8, 0)),
)]
_LEAF = st.sampled_from(["true", "false", "tcp", "udp", "dst_port == 53", "icmp"])
_EXPR = st.recursive(_LEAF, lambda inner: st.one_of(
    inner.map(lambda e: f"!({e})"),
    st.lists(inner, min_size=2, max_size=3).map(lambda es: "(" + " && ".join(es) + ")"),
    st.lists(inner, min_size=2, max_size=3).map(lambda es: "(" + " || ".join(es) + ")")), max_leaves=8)


@settings(max_examples=400)
@given(_EXPR)
def test_a_constant_is_what_every_packet_gets(text):
    expr = analyze(text).expr
    value = constant(expr)
    verdicts = {evaluate(expr, p, d) for p in PACKETS for d in ("ingress", "egress")}
    if value is not None:
        assert verdicts == {value}
