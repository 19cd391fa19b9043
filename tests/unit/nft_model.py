"""A model of how nf_tables evaluates the rules bpfwall's lowering emits.

Used by the unit tests to run lowered chains on raw packets without a kernel.
It models exactly what the lowering relies on: a match whose expression cannot
be evaluated (no L4 protocol, a transport header of a non-first fragment, bytes
beyond the packet) fails the rule (NFT_BREAK); `meta l4proto` fails when the
protocol is unknown; typed address payloads carry their family dependency; a
rule's statements run only when all its matches hold. The L4 protocol and
offset are taken from the language's own packet walk (the kernel's
ipv6_find_hdr agrees with it except past 8 extension headers).
"""
from __future__ import annotations

import ipaddress

from bpfwall.lang.packet import _v4_l4, _v6_l4

L4PROTO = {"tcp": 6, "udp": 17, "icmp": 1, "ipv6-icmp": 58}


class Break(Exception):
    """An expression that cannot be evaluated on this packet."""


class Packet:
    def __init__(self, data: bytes, device: str = "lo"):
        self.data = bytes(data)
        self.device = device  # iifname in the input hook, oifname in the output hook
        self.family = data[0] >> 4
        proto, l4, off = (_v4_l4 if self.family == 4 else _v6_l4)(self.data)
        self.proto, self.l4, self.thoff = proto, l4, off

    def bits(self, start_bit: int, nbits: int) -> int:
        if start_bit % 8 or nbits % 8:
            raise ValueError("the lowering only reads whole bytes")
        lo, hi = start_bit // 8, (start_bit + nbits) // 8
        if hi > len(self.data):
            raise Break
        return int.from_bytes(self.data[lo:hi], "big")

    def transport(self, offset: int, nbits: int) -> int:
        if self.proto is None or not self.l4:
            raise Break
        return self.bits(self.thoff * 8 + offset, nbits)


_ADDR = {("ip", "saddr"): (4, 96, 32), ("ip", "daddr"): (4, 128, 32),
         ("ip6", "saddr"): (6, 64, 128), ("ip6", "daddr"): (6, 192, 128)}
_TH = {("th", "sport"): (0, 16), ("th", "dport"): (16, 16), ("icmp", "type"): (0, 8),
       ("icmp", "code"): (8, 8), ("icmpv6", "type"): (0, 8), ("icmpv6", "code"): (8, 8)}


def value(e, pkt: Packet):
    (kind, body), = e.items()
    if kind == "meta":
        key = body["key"]
        if key == "nfproto":
            return "ipv4" if pkt.family == 4 else "ipv6"
        if key == "l4proto":
            if pkt.proto is None:
                raise Break
            return pkt.proto
        if key == "length":
            return len(pkt.data)
        if key in ("iifname", "oifname"):
            return pkt.device
        raise ValueError(key)
    if kind == "payload":
        if "base" in body:
            if body["base"] == "nh":
                return pkt.bits(body["offset"], body["len"])
            return pkt.transport(body["offset"], body["len"])
        where = (body["protocol"], body["field"])
        if where in _ADDR:
            family, off, n = _ADDR[where]
            if pkt.family != family:
                raise Break  # the implicit `meta nfproto` dependency
            return ipaddress.ip_address(pkt.bits(off, n) if family == 4 else pkt.bits(off, n).to_bytes(16, "big"))
        if where[0] in ("icmp", "icmpv6"):  # implicit `meta l4proto icmp|ipv6-icmp`
            want = 1 if where[0] == "icmp" else 58
            if pkt.proto != want:
                raise Break
        offset, n = _TH[where]
        return pkt.transport(offset, n)
    if kind == ">>":
        return value(body[0], pkt) >> body[1]
    if kind == "&":
        return value(body[0], pkt) & body[1]
    if kind == "concat":
        return tuple(value(x, pkt) for x in body)
    raise ValueError(kind)


def _scalar(v):
    if isinstance(v, str):
        if v in L4PROTO:
            return L4PROTO[v]
        if v in ("ipv4", "ipv6"):
            return v
        return ipaddress.ip_address(v)
    return v


def element_holds(element, got) -> bool:
    if isinstance(element, dict) and "concat" in element:
        return all(element_holds(el, g) for el, g in zip(element["concat"], got, strict=False))
    if isinstance(element, dict) and "range" in element:
        lo, hi = element["range"]
        return lo <= got <= hi
    if isinstance(element, dict) and "prefix" in element:
        net = ipaddress.ip_network(f"{element['prefix']['addr']}/{element['prefix']['len']}")
        return got.version == net.version and got in net
    want = _scalar(element)
    if isinstance(want, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return got.version == want.version and got == want
    return got == want


def match_holds(m, pkt: Packet, named_sets: dict) -> bool:
    body = m["match"]
    assert body["op"] == "==", "the lowering never writes a negated match"
    got = value(body["left"], pkt)
    right = body["right"]
    if isinstance(right, str) and right.startswith("@"):
        return any(element_holds(el, got) for el in named_sets[right[1:]])
    if isinstance(right, dict) and "set" in right:
        return any(element_holds(el, got) for el in right["set"])
    if body["left"] in ({"meta": {"key": "iifname"}}, {"meta": {"key": "oifname"}}):
        # nft: a name ending in '*' compares only the bytes before it (a prefix match)
        return got[:len(right) - 1] == right[:-1] if right.endswith("*") else got == right
    return element_holds(right, got)


_L3_OF = {"ip": "ip", "ip6": "ip6", "icmp": "ip", "icmpv6": "ip6"}


def check_nft_accepts(rule) -> None:
    """What nft 1.0.6 refuses in one rule ("conflicting protocols specified"): headers of both
    IP families, both ICMPs, or an ICMP header after `meta l4proto` named another protocol."""
    headers = [x["match"]["left"]["payload"]["protocol"] for x in rule
               if "match" in x and isinstance(x["match"]["left"], dict)
               and "protocol" in x["match"]["left"].get("payload", {})]
    families = {_L3_OF[h] for h in headers if h in _L3_OF}
    assert len(families) <= 1, f"nft refuses ip with ip6: {rule}"
    assert not {"icmp", "icmpv6"} <= set(headers), f"nft refuses icmp with icmpv6: {rule}"
    l4 = [x["match"]["right"] for x in rule if "match" in x and x["match"]["left"] == {"meta": {"key": "l4proto"}}
          and isinstance(x["match"]["right"], str)]
    for h in headers:
        if h in ("icmp", "icmpv6"):
            assert all(v == ("icmp" if h == "icmp" else "ipv6-icmp") for v in l4), f"nft refuses {l4} with {h}: {rule}"


def run(chains, packet: bytes, named_sets: dict, device: str = "lo") -> tuple[str, str]:
    """(counter name, final verdict) for one packet, by `device`, through lowered Chains."""
    for rules in chains.rules.values():
        for rule in rules:
            check_nft_accepts(rule)
    pkt = Packet(packet, device)
    chain, position, stack, hops = chains.names[0], 0, [], 0
    while True:
        rules = chains.rules[chain]
        for index in range(position, len(rules)):
            rule = rules[index]
            matches = [x for x in rule if "match" in x]
            stmts = [x for x in rule if "match" not in x]
            try:
                if not all(match_holds(m, pkt, named_sets) for m in matches):
                    continue
            except Break:
                continue
            counter = next((s["counter"] for s in stmts if "counter" in s), None)
            verdict = stmts[-1]
            hops += 1
            assert hops < 10_000
            if "jump" in verdict:
                stack.append((chain, index + 1))
                assert len(stack) < 16, "jump stack overflow"
            if "goto" in verdict or "jump" in verdict:
                chain, position = next(iter(verdict.values()))["target"], 0
                break
            if "return" in verdict:
                assert stack, "return from the entry chain"
                chain, position = stack.pop()
                break
            return counter, next(iter(verdict))
        else:
            raise AssertionError(f"chain {chain} ended without a verdict")
