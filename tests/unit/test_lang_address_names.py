"""systemd's address names (`any`, `localhost`, `link-local`, `multicast`): exactly systemd's
ranges, in both families, wherever a network goes; printed back by name."""
import ipaddress

import pytest

from bpfwall.lang.checker import analyze
from bpfwall.lang.errors import LangError
from bpfwall.lang.evaluator import evaluate
from bpfwall.lang.packet import parse_packet
from bpfwall.lang.values import parse_set_elements
from tests.unit import packets as pk


def udp_from(addr: str):
    build = pk.ipv4 if ipaddress.ip_address(addr).version == 4 else pk.ipv6
    other = "10.9.9.9" if build is pk.ipv4 else "2001:db8::9"
    return parse_packet(build(addr, other, pk.UDP, pk.udp(1000, 53)))


# (name, addresses inside, addresses just outside) — systemd.resource-control(5), IPAddressAllow=
EDGES = [
    ("localhost", ["127.0.0.0", "127.255.255.255", "::1"], ["126.255.255.255", "128.0.0.0", "::2", "::"]),
    ("link-local", ["169.254.0.0", "169.254.255.255", "fe80::", "fe80::ffff:ffff:ffff:ffff"],
     ["169.253.255.255", "169.255.0.0", "fe80:0:0:1::", "fe7f:ffff::1"]),
    ("multicast", ["224.0.0.0", "239.255.255.255", "ff00::", "ff02::fb", "ffff::1"],
     ["223.255.255.255", "240.0.0.0", "feff::1"]),
    ("any", ["0.0.0.0", "255.255.255.255", "::", "2001:db8::1"], []),
]


@pytest.mark.parametrize("name,inside,outside", EDGES, ids=[e[0] for e in EDGES])
def test_exactly_systemds_ranges(name, inside, outside):
    expr = analyze(f"saddr in {name}").expr
    for addr in inside:
        assert evaluate(expr, udp_from(addr), "ingress"), addr
    for addr in outside:
        assert not evaluate(expr, udp_from(addr), "ingress"), addr


@pytest.mark.parametrize("text,normal", [
    ("remote_addr in localhost", "remote_addr in localhost"),
    ("saddr in {link-local,10.0.0.0/8 , multicast}", "saddr in {link-local, 10.0.0.0/8, multicast}"),
    ("not remote_addr in any", "!(remote_addr in any)"),
    ("daddr in link-local||tcp", "daddr in link-local || tcp"),
])
def test_printed_back_by_name(text, normal):
    assert analyze(text).text == normal
    assert analyze(normal).text == normal


def test_mixed_with_literals_and_aliases():
    expr = analyze("remote_addr in {localhost, 192.168.0.0/16}").expr
    assert evaluate(expr, udp_from("192.168.3.4"), "ingress")
    assert evaluate(expr, udp_from("::1"), "ingress")
    assert not evaluate(expr, udp_from("::1"), "egress")  # egress: remote = daddr = 2001:db8::9


@pytest.mark.parametrize("text,message,col", [
    ("saddr == localhost", "use 'in' to match a network: saddr in localhost", 10),
    ("localhost", "localhost is a name for networks, not a condition; e.g. remote_addr in localhost", 1),
    ("localhost in any", "localhost is a name for networks; look an address up in it", 1),
    ("dst_port in {80, localhost}", "a set cannot mix numbers and addresses", 18),
    ("dst_port in multicast", "cannot match dst_port (a number) against a network", 13),
    ("saddr in localhost..any", "address ranges are not supported", 10),
    ("saddr in link - local", "unexpected character '-'", 15),
])
def test_misuse(text, message, col):
    with pytest.raises(LangError) as info:
        analyze(text)
    assert message in info.value.message and info.value.col == col


def test_names_are_set_elements():
    assert parse_set_elements("s", "address", "localhost, 10.0.0.0/8") == [
        ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"), ipaddress.ip_network("10.0.0.0/8")]
    assert parse_set_elements("s", "address", "multicast") == [
        ipaddress.ip_network("224.0.0.0/4"), ipaddress.ip_network("ff00::/8")]
    with pytest.raises(LangError, match="not a number"):
        parse_set_elements("s", "number", "localhost")
