"""The reference verdicts on hand-built packets."""
import ipaddress

import pytest
from hypothesis import given, settings, strategies as st

from bpfwall.lang.checker import analyze
from bpfwall.lang.evaluator import evaluate
from bpfwall.lang.packet import parse_packet
from tests.strategies import expressions, packets, param_values, set_values
from tests.unit import packets as pk

UDP4 = parse_packet(pk.ipv4("10.0.0.1", "192.168.1.1", pk.UDP, pk.udp(5353, 53)))  # 28 bytes
TCP6 = parse_packet(pk.ipv6("2001:db8::1", "fe80::1", pk.TCP, pk.tcp(40000, 443)))  # 60 bytes
ICMP4 = parse_packet(pk.ipv4("10.0.0.2", "10.0.0.1", pk.ICMP, pk.icmp(8, 0)))
ICMP6 = parse_packet(pk.ipv6("::1", "::1", pk.ICMPV6, pk.icmp(128, 0)))
MAPPED = parse_packet(pk.ipv6("::ffff:10.0.0.1", "::1", pk.UDP, pk.udp(1, 53)))
FRAG4 = parse_packet(pk.ipv4("10.0.0.1", "10.0.0.2", pk.TCP, pk.tcp(1, 80), frag_offset=5))


def ev(text, packet, direction="ingress", params=None, sets=None):
    return evaluate(analyze(text).expr, packet, direction, params, sets)


@pytest.mark.parametrize("text,packet,expected", [
    ("ip", UDP4, True), ("ip", TCP6, False), ("ipv6", TCP6, True),
    ("udp", UDP4, True), ("tcp", TCP6, True), ("icmp", ICMP4, True), ("icmp", ICMP6, True), ("icmp", UDP4, False),
    ("true", UDP4, True), ("false", UDP4, False),
    ("icmp || (udp && dst_port == 53) || (tcp && dst_port == 80)", UDP4, True),
    ("icmp || (udp && dst_port == 53) || (tcp && dst_port == 80)", TCP6, False),
    ("!dst_port == 53", UDP4, False), ("not udp or dst_port != 53", UDP4, False),
    ("src_port > 5000 && src_port >= 5353 && src_port < 5354 && src_port <= 5353", UDP4, True),
    ("len == 28", UDP4, True), ("len == 60", TCP6, True),
    # Absent numbers read 0.
    ("dst_port == 0 && src_port == 0", ICMP4, True), ("icmp_type == 0 && icmp_code == 0", UDP4, True),
    ("icmp_type == 8", ICMP4, True), ("icmp_type == 128", ICMP6, True),
    ("tcp && dst_port == 0", FRAG4, True),
    # Ranges and sets.
    ("dst_port in 50..60", UDP4, True), ("dst_port in 53..53", UDP4, True), ("dst_port in 54..60", UDP4, False),
    ("dst_port in {80, 443, 8000..8100}", TCP6, True), ("dst_port in {80, 8000..8100}", TCP6, False),
    ("src_port in {1..5353}", UDP4, True),
    # Addresses.
    ("saddr == 10.0.0.1", UDP4, True), ("saddr != 10.0.0.1", UDP4, False), ("daddr == 10.0.0.1", UDP4, False),
    ("saddr in 10.0.0.0/8", UDP4, True), ("daddr in 10.0.0.0/8", UDP4, False), ("saddr in 0.0.0.0/0", UDP4, True),
    ("saddr in ::/0", UDP4, False), ("saddr in 0.0.0.0/0", TCP6, False), ("saddr in ::/0", TCP6, True),
    ("saddr in 2001:db8::/32", TCP6, True), ("saddr == 2001:db8::1", TCP6, True),
    ("saddr in {192.168.0.0/16, fe80::/10}", TCP6, False), ("daddr in {192.168.0.0/16, fe80::/10}", TCP6, True),
    ("daddr in {192.168.1.1, ::2}", UDP4, True),
    # An IPv4 literal never matches an IPv6 packet, mapped or not; != is !(==).
    ("saddr == 10.0.0.1", MAPPED, False), ("saddr != 10.0.0.1", MAPPED, True), ("saddr in 10.0.0.0/8", MAPPED, False),
    ("saddr == ::ffff:10.0.0.1", MAPPED, True), ("saddr in ::ffff:0:0/96", MAPPED, True),
    ("saddr == ::1", UDP4, False), ("saddr != ::1", UDP4, True),
    # Field against field.
    ("saddr == daddr", ICMP6, True), ("saddr == daddr", UDP4, False), ("saddr != daddr", UDP4, True),
    ("src_port > dst_port", UDP4, True),
    # Literals and params alone.
    ("1 < 2", UDP4, True), ("10.0.0.1 == 10.0.0.1", UDP4, True), ("10.0.0.1 == ::ffff:10.0.0.1", UDP4, False),
    ("10.0.0.1 in 10.0.0.0/8", UDP4, True), ("10.0.0.0/16 in 10.0.0.0/8", UDP4, True),
    ("3 in {1..2, 4}", UDP4, False),
])
def test_verdicts(text, packet, expected):
    assert ev(text, packet) is expected


def test_aliases_follow_the_direction():
    assert ev("local_port == 53 && remote_port == 5353", UDP4, "ingress")
    assert ev("local_port == 5353 && remote_port == 53", UDP4, "egress")
    assert ev("local_addr == 192.168.1.1 && remote_addr == 10.0.0.1", UDP4, "ingress")
    assert ev("local_addr == 10.0.0.1 && remote_addr in 192.168.0.0/16", UDP4, "egress")


def test_params_read_zero_when_unset_and_are_u64():
    assert ev("dst_port == $p", ICMP4)
    assert ev("dst_port == $p", UDP4, params={"p": 53})
    assert ev("$big > 65535 && $big == 18446744073709551615", UDP4, params={"big": 2**64 - 1})
    assert ev("dst_port in $lo..$hi", UDP4, params={"lo": 50, "hi": 60})
    assert not ev("dst_port in $lo..$hi", UDP4, params={"lo": 60, "hi": 50})  # an empty range
    assert ev("dst_port in {1, $p}", UDP4, params={"p": 53})
    assert not ev("dst_port in {1, $p}", UDP4)


def test_sets():
    nums = {"s": [80, (50, 60)]}
    assert ev("dst_port in @s", UDP4, sets=nums) and not ev("dst_port in @s", TCP6, sets=nums)
    assert not ev("dst_port in @s", UDP4)  # unset: empty
    nets = {"n": [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fe80::/10")]}
    assert ev("saddr in @n", UDP4, sets=nets) and ev("daddr in @n", TCP6, sets=nets)
    assert not ev("saddr in @n", TCP6, sets=nets) and not ev("saddr in @n", MAPPED, sets=nets)
    assert ev("remote_addr in @n", UDP4, "ingress", sets=nets)
    assert not ev("remote_addr in @n", UDP4, "egress", sets=nets)


def test_direction_is_checked():
    with pytest.raises(ValueError):
        ev("tcp", UDP4, "sideways")


@settings(max_examples=200)
@given(st.data())
def test_generated_scenarios_evaluate(data):
    """The shapes the kernel tier draws all evaluate; ¬e is always the opposite verdict."""
    checked = analyze(data.draw(expressions()))
    params = {n: data.draw(param_values()) for n in checked.params}
    sets = {n: data.draw(set_values(k)) for n, k in checked.sets.items()}
    direction = data.draw(st.sampled_from(["ingress", "egress"]))
    fields = parse_packet(data.draw(packets()))
    verdict = evaluate(checked.expr, fields, direction, params, sets)
    negated = analyze(f"!({checked.text})").expr
    assert evaluate(negated, fields, direction, params, sets) is (not verdict)
