"""`ifname`: the device a packet arrives on (ingress) or leaves by (egress), by name or by a
`prefix*` pattern; what is accepted, how it prints and decides, and every way it is refused."""
from dataclasses import replace

import pytest

from bpfwall.lang.checker import MAX_INTERFACES, analyze, analyze_pair
from bpfwall.lang.errors import LangError
from bpfwall.lang.evaluator import evaluate
from bpfwall.lang.packet import parse_packet
from bpfwall.lang.values import interface_matches
from tests.unit import packets as pk

UDP = parse_packet(pk.ipv4("10.0.0.1", "10.0.0.2", pk.UDP, pk.udp(1000, 53)))


@pytest.mark.parametrize("text,normal,names", [
    ('ifname=="wg0"', 'ifname == "wg0"', ("wg0",)),
    ('ifname in {"eth0","wlan*"}', 'ifname in {"eth0", "wlan*"}', ("eth0", "wlan*")),
    ('not ifname == "lo" and udp', '!(ifname == "lo") && udp', ("lo",)),
    ('"wg0" != ifname || ifname == "wg0"', '"wg0" != ifname || ifname == "wg0"', ("wg0",)),
    ('ifname == "br-lan.10" || ifname == "veth@x_1"', 'ifname == "br-lan.10" || ifname == "veth@x_1"',
     ("br-lan.10", "veth@x_1")),
    ('ifname == "*"', 'ifname == "*"', ("*",)),
])
def test_accepted_and_printed_back(text, normal, names):
    checked = analyze(text)
    assert (checked.text, checked.interfaces) == (normal, names)
    assert analyze(normal).text == normal


@pytest.mark.parametrize("device,expected", [
    ("wg0", [True, False, False]), ("wlan0", [False, True, True]), ("wlan", [False, True, True]),
    ("eth0", [False, True, True]), ("eth01", [False, False, True]), (None, [False, False, True]),
])
def test_verdicts(device, expected):
    packet = replace(UDP, ifname=device)
    texts = ['ifname == "wg0"', 'ifname in {"eth0", "wlan*"}', 'ifname != "wg0" && !(ifname in {"eth01"})']
    assert [evaluate(analyze(t).expr, packet, "egress") for t in texts] == [
        expected[0], expected[1], device not in ("wg0", "eth01")]


def test_pattern_is_a_prefix_match_as_in_nft():
    assert interface_matches("wlan*", "wlan") and interface_matches("wlan*", "wlan0")
    assert not interface_matches("wlan*", "wla") and not interface_matches("wlan", "wlan0")
    assert interface_matches("*", "anything") and not interface_matches("*", None)


@pytest.mark.parametrize("text,message,col", [
    ("ifname", 'ifname is an interface name; compare it, e.g. ifname == "wg0"', 1),
    ('"wg0"', 'is an interface name; compare it, e.g. ifname == "wg0"', 1),
    ('ifname < "wg0"', "interface names have no order; use ==, != or in", 1),
    ('"a" == "b"', 'compare ifname with a name, e.g. ifname == "a"', 1),
    ("ifname in @links", 'interface names are not kept in @sets; list them: ifname in {"wg0", "wlan*"}', 11),
    ('ifname in {"a", 5}', "cannot match ifname (an interface) against 5", 17),
    ('dst_port in {"a"}', "cannot match dst_port (a number) against a set of interface names", 13),
    ('dst_port in {80, "a"}', "a set cannot mix interface names with numbers or addresses", 18),
    ('saddr == "x"', 'cannot compare saddr (an address) with "x" (an interface)', 10),
    ('"x" in {"x"}', 'look ifname up in a set of names, e.g. ifname in {"x"}', 1),
    ('ifname in {"a".."b"}', 'interface names have no ranges; match a beginning with "name*"', 12),
    ('ifname == "a:b"', "\"a:b\" is not an interface name (no ':'", 11),
    ('ifname == "a*b"', "\"a*b\" is not an interface name ('*' only at the end", 11),
    ('ifname == "a b"', "\"a b\" is not an interface name (no ' '", 11),
    ('ifname == ""', "an empty interface name", 11),
    ('ifname == "abcdefghijklmnop"', "is too long for an interface name (at most 15 characters)", 11),
    ('ifname == "wg0', "missing '\"' to close the interface name", 11),
    ("ifname == 'wg0'", "unexpected character \"'\"", 11),
])
def test_refused(text, message, col):
    with pytest.raises(LangError) as info:
        analyze(text)
    assert message in info.value.message and info.value.col == col


def test_at_most_64_names_per_unit():
    many = lambda lo, hi: "ifname in {" + ", ".join(f'"n{i}"' for i in range(lo, hi)) + "}"  # noqa: E731
    assert len(analyze(many(0, MAX_INTERFACES)).interfaces) == MAX_INTERFACES
    with pytest.raises(LangError, match="65 different interface names; a unit can have at most 64"):
        analyze(many(0, MAX_INTERFACES + 1))
    with pytest.raises(LangError, match="in ingress and egress; a unit can have at most 64"):
        analyze_pair(many(0, 40), many(30, 70))


def test_help_language_names_its_type():
    from bpfwall.lang.reference import fields, reference

    assert [(n, t) for n, t, _, _ in fields() if n == "ifname"] == [("ifname", "interface name")]
    assert 'ifname in {"wg0", "wlan*"}' in reference()
