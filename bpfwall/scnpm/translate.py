"""One nft rule → a bpfwall condition and a verdict, or the reason it cannot be one.

Translated: `ip|ip6 saddr|daddr` (addresses, networks, ranges, sets, @named sets),
`tcp|udp sport|dport` (numbers, services, ranges, sets, @sets, comparisons),
`meta l4proto`, `ip protocol`, `meta nfproto`, `icmp|icmpv6 type|code`,
`meta length`, `iifname|oifname` (names, `prefix*`, sets of them: `ifname`, on the
direction whose device nft reads), `socket cgroupv2 level N "path"` (which cgroup the rule is for),
the verdicts accept, drop, reject (→ drop), jump, goto, return and continue
(which flow.py follows through the chains), and the statements that do not
change a verdict (counter, log, comment). nft adds a protocol dependency to
every header match (`tcp dport 80` only matches TCP); the translation writes
it out (`tcp && dst_port == 80`).
"""
from __future__ import annotations

import ipaddress
import json
import socket
from dataclasses import dataclass, field

from ..lang.values import NAME_RE, interface_matches, interface_pattern, parse_number

ICMP_TYPES = {
    "echo-reply": 0, "destination-unreachable": 3, "source-quench": 4, "redirect": 5, "echo-request": 8,
    "router-advertisement": 9, "router-solicitation": 10, "time-exceeded": 11, "parameter-problem": 12,
    "timestamp-request": 13, "timestamp-reply": 14, "info-request": 15, "info-reply": 16,
    "address-mask-request": 17, "address-mask-reply": 18,
}
ICMPV6_TYPES = {
    "destination-unreachable": 1, "packet-too-big": 2, "time-exceeded": 3, "parameter-problem": 4,
    "echo-request": 128, "echo-reply": 129, "mld-listener-query": 130, "mld-listener-report": 131,
    "mld-listener-done": 132, "mld-listener-reduction": 132, "nd-router-solicit": 133, "nd-router-advert": 134,
    "nd-neighbor-solicit": 135, "nd-neighbor-advert": 136, "nd-redirect": 137, "router-renumbering": 138,
    "ind-neighbor-solicit": 141, "ind-neighbor-advert": 142, "mld2-listener-report": 143,
}
ICMP_CODES = {
    "net-unreachable": 0, "host-unreachable": 1, "prot-unreachable": 2, "port-unreachable": 3,
    "frag-needed": 4, "net-prohibited": 9, "host-prohibited": 10, "admin-prohibited": 13,
}
ICMPV6_CODES = {
    "no-route": 0, "admin-prohibited": 1, "addr-unreachable": 3, "port-unreachable": 4, "policy-fail": 5,
    "reject-route": 6,
}
# IP protocol → the bpfwall condition for it (icmp is ICMP on v4 and ICMPv6 on v6 there).
PROTOCOLS = {"tcp": "tcp", "udp": "udp", "icmp": "ip && icmp", "ipv6-icmp": "ipv6 && icmp",
             "icmpv6": "ipv6 && icmp", "6": "tcp", "17": "udp", "1": "ip && icmp", "58": "ipv6 && icmp"}
OPS = {"==": "==", "eq": "==", "!=": "!=", "ne": "!=", "<": "<", "lt": "<", ">": ">", "gt": ">",
       "<=": "<=", "le": "<=", ">=": ">=", "ge": ">="}
# Why common nft matches have no bpfwall counterpart.
NOT_IN_LANGUAGE = {
    "ct": "ct (connection tracking) is not in bpfwall's language: it judges each packet on its own",
    "iif": "interfaces by index (iif) are not in bpfwall's language; iifname is",
    "oif": "interfaces by index (oif) are not in bpfwall's language; oifname is",
    "mark": "packet marks are not in bpfwall's language",
    "skuid": "socket owners (skuid) are not in bpfwall's language; the unit already says whose traffic it is",
    "skgid": "socket owners (skgid) are not in bpfwall's language; the unit already says whose traffic it is",
    "th": "th (any transport header) is not in bpfwall's language; write tcp dport … or udp dport …",
    "limit": "rate limits are not in bpfwall's language", "quota": "quotas are not in bpfwall's language",
    "ether": "link-layer matches (ether) are not in bpfwall's language: cgroup programs see IP packets",
    "vlan": "link-layer matches (vlan) are not in bpfwall's language: cgroup programs see IP packets",
    "arp": "ARP is not in bpfwall's language: cgroup programs see IP packets",
    "sctp": "bpfwall knows the tcp, udp and icmp protocols only (not sctp)",
    "dccp": "bpfwall knows the tcp, udp and icmp protocols only (not dccp)",
    "udplite": "bpfwall knows the tcp, udp and icmp protocols only (not udplite)",
    "fib": "fib lookups are not in bpfwall's language", "rt": "routing data (rt) is not in bpfwall's language",
    "ipsec": "ipsec matches are not in bpfwall's language",
    "snat": "NAT is not filtering", "dnat": "NAT is not filtering", "masquerade": "NAT is not filtering",
    "redirect": "NAT is not filtering", "tproxy": "tproxy is not filtering",
    "queue": "queueing to user space is not filtering",
    "vmap": "verdict maps are not followed (write one rule per element)",
}
_LOG_OPTIONS = ("prefix", "level", "flags", "group", "snaplen", "queue-threshold")


class Untranslatable(Exception):
    """Why a rule has no bpfwall equivalent; str() is one line."""


@dataclass
class Translation:
    atoms: list[str] = field(default_factory=list)    # conditions, all of which must hold
    verdict: str | None = None    # "accept" "drop" "jump" "goto" "return" "continue" | None (no verdict)
    target: str | None = None     # the chain of jump/goto
    rejects: bool = False         # the drop is a reject (which nft allows on some hooks only)
    cgroup: tuple[int, str] | None = None              # (level, path) of `socket cgroupv2`
    sets: dict[str, tuple[str, str]] = field(default_factory=dict)  # bpfwall name -> (kind, nft name)
    notes: list[str] = field(default_factory=list)
    devices: list[tuple] = field(default_factory=list)  # ("ingress"|"egress", names, negated, condition)

    def condition(self, direction: str) -> str:
        """All the matches, for a packet going `direction`. nft's iifname is the device a packet
        arrives on, oifname the one it leaves by; a sent packet has no input device and a received
        one no output device, and nft reads the name of a device a packet has not as "" (so
        `iifname != "x"` holds for every sent packet, `iifname "x"` for none)."""
        atoms = list(self.atoms)
        for going, names, negated, text in self.devices:
            if going == direction:
                atoms.append(text)
            elif any(interface_matches(n, "") for n in names) == negated:
                return "false"
        return " && ".join(f"({a})" for a in atoms) if atoms else "true"


def set_name(nft_name: str) -> str:
    """An nft set name as a bpfwall @name: characters other than letters, digits and '_' become '_'."""
    name = "".join(ch if ch.isalnum() and ch.isascii() or ch == "_" else "_" for ch in nft_name)
    return name if NAME_RE.fullmatch(name) else "_" + name


def translate(words: list[str], family: str, defines: dict[str, list[str]] | None = None) -> Translation:
    """The tokens of one rule after `FAMILY TABLE CHAIN`; Untranslatable if any part has no counterpart."""
    return _Rule(_expand(words, defines or {}), family).run()


def _expand(words: list[str], defines: dict[str, list[str]], depth: int = 0) -> list[str]:
    """`$name` replaced by what `define name = …` says."""
    out = []
    for w in words:
        if w.startswith("$"):
            if w[1:] not in defines or depth > 10:
                raise Untranslatable(f"{w} is not defined in the file")
            out += _expand(defines[w[1:]], defines, depth + 1)
        else:
            out.append(w)
    return out


class _Rule:
    def __init__(self, words: list[str], family: str):
        self.words = words
        self.pos = 0
        self.out = Translation()
        if family == "ip":
            self.out.atoms.append("ip")
        elif family == "ip6":
            self.out.atoms.append("ipv6")
        elif family != "inet":
            raise Untranslatable(f"family {family}: bpfwall filters IP traffic of sockets (ip, ip6, inet tables)")

    def peek(self, k: int = 0) -> str | None:
        return self.words[self.pos + k] if self.pos + k < len(self.words) else None

    def take(self) -> str:
        word = self.peek()
        if word is None:
            raise Untranslatable("the rule ends too early")
        self.pos += 1
        return word

    def run(self) -> Translation:
        while self.peek() is not None:
            if self.out.verdict is not None:
                raise Untranslatable(f"'{self.peek()}' after the verdict")
            word = self.take()
            handler = getattr(self, "m_" + word.replace("-", "_"), None)
            if handler is None:
                raise Untranslatable(NOT_IN_LANGUAGE.get(word, f"'{word}' is not a match bpfwall can translate"))
            handler()
        family_guard = self.out.atoms[0] if self.out.atoms[:1] in (["ip"], ["ipv6"]) else None
        if family_guard and any(a.startswith(family_guard + " && ") for a in self.out.atoms[1:]):
            del self.out.atoms[0]  # `ip saddr …` in an ip table: the table's guard says it again
        return self.out

    # -- statements without a verdict ----------------------------------------
    def m_counter(self) -> None:
        while self.peek() in ("packets", "bytes"):
            self.pos += 2

    def m_log(self) -> None:
        while self.peek() in _LOG_OPTIONS:
            self.pos += 2

    def m_comment(self) -> None:
        self.take()

    # -- verdicts -----------------------------------------------------------------
    def m_accept(self) -> None:
        self.out.verdict = "accept"

    def m_drop(self) -> None:
        self.out.verdict = "drop"

    def m_jump(self) -> None:
        self.out.verdict, self.out.target = "jump", self.take()

    def m_goto(self) -> None:
        self.out.verdict, self.out.target = "goto", self.take()

    def m_return(self) -> None:
        self.out.verdict = "return"

    def m_continue(self) -> None:
        self.out.verdict = "continue"

    def m_reject(self) -> None:
        if self.peek() == "with":
            self.pos += 1
            kind = self.take()
            if kind == "tcp":
                self.take()  # reset
            else:
                if self.peek() == "type":
                    self.pos += 1
                self.take()
        self.out.verdict, self.out.rejects = "drop", True
        self.out.notes.append("reject became drop: bpfwall drops without an ICMP error or TCP reset")

    # -- matches --------------------------------------------------------------
    def m_socket(self) -> None:
        if self.take() != "cgroupv2":
            raise Untranslatable("socket matches other than 'socket cgroupv2' are not in bpfwall's language")
        if self.take() != "level":
            raise Untranslatable("expected 'socket cgroupv2 level N \"PATH\"'")
        level = number(self.take(), 0, 255, "a cgroup level")
        op = self.op()
        path = self.take()
        if op != "==" or path.startswith(("{", "@")):
            raise Untranslatable("socket cgroupv2 must name one cgroup (== \"PATH\")")
        self.out.cgroup = (level, path.strip('"'))

    def m_meta(self) -> None:
        key = self.take()
        if key == "l4proto":
            self.protocol(guard=None)
        elif key == "nfproto":
            op, (values, _) = self.op(), self.values()
            names = {"ipv4": "ip", "ipv6": "ipv6"}
            if any(v not in names for v in values):
                raise Untranslatable(f"meta nfproto {' '.join(values)}: only ipv4 and ipv6")
            self.match(" || ".join(names[v] for v in values), op)
        elif key == "length":
            self.numbers("len", 0, 2**32 - 1, guard=None)
        elif key in ("iifname", "oifname"):
            self.device("ingress" if key == "iifname" else "egress", key)
        else:
            raise Untranslatable(NOT_IN_LANGUAGE.get(key, f"meta {key} is not in bpfwall's language"))

    def m_iifname(self) -> None:
        self.device("ingress", "iifname")

    def m_oifname(self) -> None:
        self.device("egress", "oifname")

    def device(self, direction: str, word: str) -> None:
        op = self.op()
        if op not in ("==", "!="):
            raise Untranslatable(f"'{op}' cannot compare interface names")
        if self.peek() and self.peek().startswith("@"):
            raise Untranslatable(f"{word} in a named set: bpfwall lists interface names in the expression")
        values, braced = self.values()
        names = []
        for v in values:
            try:
                names.append(interface_pattern(v[1:-1] if v.startswith('"') else v))
            except ValueError as e:
                raise Untranslatable(str(e)) from None
        quoted = [json.dumps(n) for n in names]
        text = f"ifname == {quoted[0]}" if len(names) == 1 and not braced else f"ifname in {{{', '.join(quoted)}}}"
        self.out.devices.append((direction, names, op == "!=", text if op == "==" else f"!({text})"))

    def m_ip(self) -> None:
        self.header("ip", "ip", 4)

    def m_ip6(self) -> None:
        self.header("ip6", "ipv6", 6)

    def header(self, word: str, guard: str, version: int) -> None:
        key = self.take()
        if key in ("saddr", "daddr"):
            self.addresses(key, guard, version, word)
        elif key == "protocol" and word == "ip":
            self.protocol(guard="ip")
        elif key == "nexthdr":
            raise Untranslatable("ip6 nexthdr is the first next header; bpfwall matches the final one "
                                 "(write meta l4proto)")
        else:
            raise Untranslatable(f"{word} {key} is not in bpfwall's language")

    def m_tcp(self) -> None:
        self.ports("tcp")

    def m_udp(self) -> None:
        self.ports("udp")

    def ports(self, proto: str) -> None:
        key = self.take()
        if key not in ("sport", "dport"):
            what = "TCP flags and options are" if proto == "tcp" else f"udp {key} is"
            raise Untranslatable(f"{what} not in bpfwall's language")
        field_name = "src_port" if key == "sport" else "dst_port"
        self.numbers(field_name, 0, 65535, guard=proto, names=lambda n: _service(n, proto))

    def m_icmp(self) -> None:
        self.icmp("icmp", "ip && icmp", ICMP_TYPES, ICMP_CODES)

    def m_icmpv6(self) -> None:
        self.icmp("icmpv6", "ipv6 && icmp", ICMPV6_TYPES, ICMPV6_CODES)

    def icmp(self, word: str, guard: str, types: dict, codes: dict) -> None:
        key = self.take()
        if key not in ("type", "code"):
            raise Untranslatable(f"{word} {key} is not in bpfwall's language (icmp type and code are)")
        table = types if key == "type" else codes
        self.numbers(f"icmp_{key}", 0, 255, guard=guard, names=table.get)

    # -- pieces -----------------------------------------------------------------
    def op(self) -> str:
        if self.peek() in OPS:
            return OPS[self.take()]
        return "=="

    def values(self) -> tuple[list[str], bool]:
        """One value, or the elements of an anonymous set `{ a, b }`; and whether it was a set."""
        word = self.take()
        if word == "vmap":
            raise Untranslatable(NOT_IN_LANGUAGE["vmap"])
        if word != "{":
            if "." in (word, self.peek()):
                raise Untranslatable("concatenations (a . b) are not in bpfwall's language")
            return [word], False
        out = []
        while True:
            word = self.take()
            if word == "}":
                return out, True
            if word != ",":
                out.append(word)

    def match(self, condition: str, op: str, guard: str | None = None) -> None:
        if op not in ("==", "!="):
            raise Untranslatable(f"'{op}' cannot compare this")
        text = condition if op == "==" else f"!({condition})"
        self.out.atoms.append(f"{guard} && ({text})" if guard else text)

    def protocol(self, guard: str | None) -> None:
        op, (values, _) = self.op(), self.values()
        conditions = []
        for v in values:
            if v not in PROTOCOLS:
                raise Untranslatable(f"protocol {v}: bpfwall knows tcp, udp, icmp and icmpv6 only")
            conditions.append(f"({PROTOCOLS[v]})")
        self.match(" || ".join(conditions), op, guard)

    def named_set(self, word: str, kind: str) -> str:
        name = set_name(word[1:])
        seen = self.out.sets.setdefault(name, (kind, word[1:]))
        if seen != (kind, word[1:]):
            raise Untranslatable(f"set {word} is used as two kinds of set, or two sets share the name @{name}")
        return f"@{name}"

    def numbers(self, field_name: str, lo: int, hi: int, guard: str | None, names=None) -> None:
        op = self.op()
        if self.peek() and self.peek().startswith("@"):
            self.match(f"{field_name} in {self.named_set(self.take(), 'number')}", op, guard)
            return
        values, braced = self.values()
        items = [number_item(v, lo, hi, names) for v in values]
        if op in ("<", ">", "<=", ">="):
            if len(items) != 1 or ".." in items[0]:
                raise Untranslatable(f"'{op}' needs one number")
            self.out.atoms.append(f"{guard} && {field_name} {op} {items[0]}" if guard else
                                  f"{field_name} {op} {items[0]}")
            return
        if len(values) == 1 and not braced:
            condition = f"{field_name} {'in' if '..' in items[0] else '=='} {items[0]}"
        else:
            condition = f"{field_name} in {{{', '.join(items)}}}"
        self.match(condition, op, guard)

    def addresses(self, key: str, guard: str, version: int, word: str) -> None:
        op = self.op()
        if op not in ("==", "!="):
            raise Untranslatable("addresses have no order in bpfwall's language")
        field_name = key
        if self.peek() and self.peek().startswith("@"):
            self.match(f"{field_name} in {self.named_set(self.take(), 'address')}", op, guard)
            return
        values, braced = self.values()
        networks = []
        for v in values:
            networks += address_element(v, version, word)
        if len(networks) == 1 and not braced:
            net = networks[0]
            single = net.prefixlen == net.max_prefixlen
            condition = f"{field_name} == {net.network_address}" if single else f"{field_name} in {net}"
        else:
            condition = f"{field_name} in {{{', '.join(_show_net(n) for n in networks)}}}"
        self.match(condition, op, guard)


def number_item(word: str, lo: int, hi: int, names=None) -> str:
    """`80`, `0x50`, `http`, `1000-2000` → bpfwall's `80`, `80`, `80`, `1000..2000`."""
    ends = word.split("-")
    if len(ends) != 2 or not all(_is_number(e) for e in ends):
        ends = [word]  # a number or a name (service names may contain '-')
    numbers = [number(e, lo, hi, "a value", names) for e in ends]
    if len(numbers) == 2:
        if numbers[0] > numbers[1]:
            raise Untranslatable(f"empty range {word}")
        return f"{numbers[0]}..{numbers[1]}"
    return str(numbers[0])


def number(word: str, lo: int, hi: int, what: str, names=None) -> int:
    value = parse_number(word) if _is_number(word) else (names(word) if names else None)
    if value is None:
        raise Untranslatable(f"'{word}' is not {what} bpfwall knows")
    if not lo <= value <= hi:
        raise Untranslatable(f"{word} is out of range ({lo}..{hi})")
    return value


def any_service(name: str) -> int | None:
    """A service name of a set whose protocol is not known: TCP's number, else UDP's."""
    return _service(name, "tcp") or _service(name, "udp")


def address_element(word: str, version: int | None, where: str = "") -> list:
    """`10.0.0.1`, `10.0.0.0/8`, `10.0.0.1-10.0.0.9` → networks (a range becomes the CIDRs covering it)."""
    try:
        if "-" in word and "/" not in word:
            first, last = (ipaddress.ip_address(p) for p in word.split("-", 1))
            networks = list(ipaddress.summarize_address_range(first, last))
        else:
            networks = [ipaddress.ip_network(word, strict=False)]
    except (ValueError, TypeError):
        raise Untranslatable(f"'{word}' is not an address, a network or an address range") from None
    if version is not None and networks[0].version != version:
        raise Untranslatable(f"{word} is an IPv{networks[0].version} address in an {where} match")
    return networks


def _show_net(net) -> str:
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


def _is_number(word: str) -> bool:
    try:
        parse_number(word)
        return True
    except ValueError:
        return False


def _service(name: str, proto: str) -> int | None:
    try:
        return socket.getservbyname(name, proto)
    except OSError:
        return None
