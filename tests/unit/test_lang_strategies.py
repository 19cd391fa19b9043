"""The shared strategies reach every feature (the kernel tier relies on them for coverage)."""
import ipaddress
import re

from hypothesis import HealthCheck, Phase, given, settings

from bpfwall.lang import ast
from bpfwall.lang.checker import analyze
from bpfwall.lang.fields import ALIASES, FIELDS
from bpfwall.lang.packet import parse_packet
from tests.strategies import ICMP4_TYPES, ICMP6_TYPES, PORTS, expressions, packets
from tests.unit import packets as pk

SAMPLE = settings(max_examples=1000, database=None, phases=[Phase.generate], deadline=None,
                  suppress_health_check=list(HealthCheck))


def _nodes(expr):
    stack = [expr]
    while stack:
        node = stack.pop()
        yield node
        for value in vars(node).values():
            if isinstance(value, tuple):
                stack.extend(v for v in value if hasattr(v, "col"))
            elif hasattr(value, "col"):
                stack.append(value)


def _has(predicate):
    return lambda text, checked: any(predicate(n) for n in _nodes(checked.expr))


EXPRESSION_FEATURES = {
    **{f"field {n}": _has(lambda node, n=n: isinstance(node, ast.Field) and node.name == n)
       for n in list(FIELDS) + list(ALIASES)},
    **{f"op {op}": _has(lambda node, op=op: isinstance(node, ast.Compare) and node.op == op)
       for op in ("==", "!=", "<", "<=", ">", ">=")},
    "range": _has(lambda n: isinstance(n, ast.In) and isinstance(n.container, ast.Range)),
    "set literal with a range": _has(lambda n: isinstance(n, ast.SetLit) and any(isinstance(i, ast.Range) for i in n.items)),
    "v4 and v6 in one set": _has(lambda n: isinstance(n, ast.SetLit) and {i.net.version for i in n.items if isinstance(i, ast.AddrLit)} == {4, 6}),
    "v6 cidr": _has(lambda n: isinstance(n, ast.AddrLit) and n.cidr and n.net.version == 6),
    "v4 host": _has(lambda n: isinstance(n, ast.AddrLit) and not n.cidr and n.net.version == 4),
    "param bound": _has(lambda n: isinstance(n, ast.Range) and isinstance(n.lo, ast.Param)),
    "param subject": _has(lambda n: isinstance(n, ast.In) and isinstance(n.subject, ast.Param)),
    "address literal subject": _has(lambda n: isinstance(n, ast.In) and isinstance(n.subject, ast.AddrLit)),
    "constant": _has(lambda n: isinstance(n, ast.BoolConst)),
    "field vs field": _has(lambda n: isinstance(n, ast.Compare) and all(isinstance(s, ast.Field) for s in (n.left, n.right))),
    "number set": lambda t, c: "number" in c.sets.values(),
    "address set": lambda t, c: "address" in c.sets.values(),
    "nesting": lambda t, c: re.search(r"(!|not)\s*\(.*(\|\||or)", t) is not None,
    "keywords": lambda t, c: " and " in t or " or " in t,
    "hex": lambda t, c: "0x" in t,
    "address name": _has(lambda n: isinstance(n, ast.AddrName)),
    "interface pattern": _has(lambda n: isinstance(n, ast.StrLit) and n.value.endswith("*")),
    "interface set": _has(lambda n: isinstance(n, ast.In) and isinstance(n.container, ast.SetLit)
                          and isinstance(n.container.items[0], ast.StrLit)),
}


def _missing(strategy, features, *prepare) -> set:
    """The features no example among SAMPLE's draws of `strategy` has."""
    missing = set(features)

    @SAMPLE
    @given(strategy)
    def sample(example):
        args = (example, *(p(example) for p in prepare))
        missing.difference_update([f for f in missing if features[f](*args)])

    sample()
    return missing


def test_expressions_reach_every_feature():
    assert _missing(expressions(), EXPRESSION_FEATURES, analyze) == set()


def _chain(data):
    """The extension header kinds an IPv6 packet starts with."""
    nh, off, kinds = data[6], 40, []
    while nh in (pk.HOPOPTS, pk.ROUTING, pk.DSTOPTS, pk.AH, pk.FRAGMENT) and off + 2 <= len(data):
        kinds.append(nh)
        size = 8 if nh == pk.FRAGMENT else (data[off + 1] + 2) * 4 if nh == pk.AH else (data[off + 1] + 1) * 8
        nh, off = data[off], off + size
    return kinds


PACKET_FEATURES = {
    "v4 tcp ports": lambda d, f: f.ip and f.tcp and f.dst_port in PORTS[1:],
    "v6 udp ports": lambda d, f: f.ipv6 and f.udp and f.dst_port in PORTS[1:],
    "icmp": lambda d, f: f.ip and f.icmp and f.icmp_type in ICMP4_TYPES,
    "icmpv6": lambda d, f: f.ipv6 and f.icmp and f.icmp_type in ICMP6_TYPES,
    "v4 options": lambda d, f: f.ip and (d[0] & 0xF) > 5 and f.l4,
    "v4 bad ihl": lambda d, f: f.ip and f.proto is None,
    "v4 fragment": lambda d, f: f.ip and f.proto is not None and not f.l4,
    "v6 fragment": lambda d, f: f.ipv6 and f.proto is not None and not f.l4,
    "v6 AH": lambda d, f: f.ipv6 and pk.AH in _chain(d) and f.l4,
    "v6 hop-by-hop": lambda d, f: f.ipv6 and pk.HOPOPTS in _chain(d),
    "v6 routing": lambda d, f: f.ipv6 and pk.ROUTING in _chain(d),
    "v6 too many headers": lambda d, f: f.ipv6 and len(_chain(d)) > 8,
    "v6 truncated chain": lambda d, f: f.ipv6 and f.proto is None and len(_chain(d)) <= 8,
    "short l4": lambda d, f: f.udp and f.l4 and f.dst_port == 0 and f.src_port == 0,
    "mapped address": lambda d, f: f.saddr == ipaddress.ip_address("::ffff:10.0.0.1"),
    "other protocol": lambda d, f: f.proto not in (None, 1, 6, 17, 58),
}


def test_packets_reach_every_feature():
    assert _missing(packets(), PACKET_FEATURES, parse_packet) == set()
