"""A model of how nf_tables judges a locally sent packet, for rulesets built from the
constructs import-scnpm translates; and hypothesis strategies that draw such rulesets.

The model runs chains the way the kernel's nft_do_chain does, with an explicit jump stack
(independent of the importer's fold into one expression): rules in order; a rule whose
matches all hold applies its verdict; `jump` pushes the place after the rule, `goto` does
not; `return` and falling off a chain's end pop the stack, or, in the base chain, give its
policy. Every base chain on the hook judges the packet in priority order; drop ends it,
accept only ends that chain. An `ip` (`ip6`) table's chains see IPv4 (IPv6) packets only.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from hypothesis import strategies as st

from bpfwall.lang.values import interface_matches

UNIT = "a.service"
CGROUP = "system.slice/a.service"
OTHER = "system.slice/b.service"
_V4 = ["10.0.0.0/8", "10.0.0.1", "192.168.0.0/16", "127.0.0.0/8"]
_V6 = ["2001:db8::/32", "::1", "fe80::/10"]
PORTS = [22, 53, 80, 443, 1024]
IFNAMES = ["sa", "my-vpn", "lo", "s*", "wg0"]   # the kernel test's packets leave by sa or my-vpn


@dataclass
class MRule:
    matches: list[str]       # nft text of each match
    predicates: list         # PacketFields -> bool, one per match
    verdict: str             # accept drop reject return continue counter jump goto
    target: str | None = None
    unit: str | None = None  # added by this unit's scnpm comment (at the end of the chain)

    def text(self) -> str:
        verdict = f"{self.verdict} {self.target}" if self.target else self.verdict
        return " ".join([*self.matches, verdict])


@dataclass
class MChain:
    name: str
    hook: str | None = None
    priority: int = 0
    policy: str | None = None
    rules: list[MRule] = field(default_factory=list)


@dataclass
class MTable:
    family: str
    name: str
    chains: list[MChain]


def nft_passes(tables: list[MTable], hooks: tuple[str, ...], fields) -> bool:
    """Whether nft lets the packet through the base chains on `hooks` (in that order)."""
    bases = [(hooks.index(c.hook), c.priority, t, c) for t in tables for c in t.chains if c.hook in hooks]
    for _, _, table, chain in sorted(bases, key=lambda b: (b[0], b[1])):
        if table.family == "ip" and fields.family != 4 or table.family == "ip6" and fields.family != 6:
            continue
        if _run_base(table, chain, fields) == "drop":
            return False
    return True


def _run_base(table: MTable, base: MChain, fields) -> str:
    chains = {c.name: c for c in table.chains}
    stack: list[tuple[MChain, int]] = []
    chain, i = base, 0
    while True:
        if i == len(chain.rules):
            if not stack:
                return base.policy or "accept"
            chain, i = stack.pop()
            continue
        rule = chain.rules[i]
        i += 1
        if not all(p(fields) for p in rule.predicates):
            continue
        if rule.verdict in ("accept", "drop", "reject"):
            return "accept" if rule.verdict == "accept" else "drop"
        if rule.verdict == "return":
            if not stack:
                return base.policy or "accept"
            chain, i = stack.pop()
        elif rule.verdict == "jump":
            stack.append((chain, i))
            chain, i = chains[rule.target], 0
        elif rule.verdict == "goto":
            chain, i = chains[rule.target], 0


def render(tables: list[MTable], flat: bool = False) -> str:
    """The ruleset as nftables.conf text (table blocks, or flat `add` commands), the unit's rules
    as scnpm comments."""
    out, comments = [], []
    for t in tables:
        if flat:
            out.append(f"add table {t.family} {t.name}")
        else:
            out.append(f"table {t.family} {t.name} {{")
        for c in t.chains:
            head = f"type filter hook {c.hook} priority {c.priority}; " if c.hook else ""
            head += f"policy {c.policy}; " if c.policy else ""
            body = [r.text() for r in c.rules if r.unit is None]
            if flat:
                out.append(f"add chain {t.family} {t.name} {c.name} {{ {head}}}")
            else:
                out.append(f"  chain {c.name} {{ {head}")
                out.extend(f"    {line}" for line in body)
                out.append("  }")
        if not flat:
            out.append("}")
        for c in t.chains:
            if flat:
                out.extend(f"add rule {t.family} {t.name} {c.name} {r.text()}" for r in c.rules if r.unit is None)
            comments.extend(f"# {r.unit} :: add rule {t.family} {t.name} {c.name} {r.text()}"
                            for r in c.rules if r.unit is not None)
    return "\n".join(out + comments) + "\n"


# -- strategies ---------------------------------------------------------------------

def _in_ports(value, spec):
    return any(lo <= value <= hi for lo, hi in spec)


@st.composite
def nft_match(draw, family: str = "inet", direction: str = "egress"):
    """(nft text, predicate over PacketFields) for one match nft and bpfwall both know, valid in a
    table of `family`, for packets going `direction`."""
    kinds = ["port", "ports", "addr", "proto", "icmp", "length", "counter", "iface"] + \
        (["nfproto"] if family == "inet" else [])
    kind = draw(st.sampled_from(kinds))
    v6 = {"ip": False, "ip6": True}.get(family) if family != "inet" else draw(st.booleans())
    if kind in ("port", "ports"):
        proto, key = draw(st.sampled_from(["tcp", "udp"])), draw(st.sampled_from(["sport", "dport"]))
        attr = "src_port" if key == "sport" else "dst_port"
        if kind == "port":
            op, n = draw(st.sampled_from(["", "!= ", "< ", ">= "])), draw(st.sampled_from(PORTS))
            test = {"": int.__eq__, "!= ": int.__ne__, "< ": int.__lt__, ">= ": int.__ge__}[op]
            return f"{proto} {key} {op}{n}", lambda f: getattr(f, proto) and test(getattr(f, attr), n)
        spans = draw(st.lists(st.tuples(st.sampled_from(PORTS), st.integers(0, 500)), min_size=1, max_size=3))
        spans = [(lo, min(lo + w, 65535)) for lo, w in spans]
        neg = draw(st.booleans())
        text = "{ " + ", ".join(f"{lo}-{hi}" if hi > lo else str(lo) for lo, hi in spans) + " }"
        return (f"{proto} {key} {'!= ' if neg else ''}{text}",
                lambda f: getattr(f, proto) and _in_ports(getattr(f, attr), spans) != neg)
    if kind == "addr":
        nets = draw(st.lists(st.sampled_from(_V6 if v6 else _V4), min_size=1, max_size=2, unique=True))
        key, neg = draw(st.sampled_from(["saddr", "daddr"])), draw(st.booleans())
        value = nets[0] if len(nets) == 1 else "{ " + ", ".join(nets) + " }"
        networks = [ipaddress.ip_network(n) for n in nets]
        version = 6 if v6 else 4
        return (f"{'ip6' if v6 else 'ip'} {key} {'!= ' if neg else ''}{value}",
                lambda f: f.family == version and any(getattr(f, key) in n for n in networks) != neg)
    if kind == "proto":
        names = draw(st.lists(st.sampled_from(["tcp", "udp", "icmp", "ipv6-icmp"]), min_size=1, max_size=2,
                              unique=True))
        ok = {"tcp": lambda f: f.tcp, "udp": lambda f: f.udp, "icmp": lambda f: f.family == 4 and f.proto == 1,
              "ipv6-icmp": lambda f: f.family == 6 and f.proto == 58}
        value = names[0] if len(names) == 1 else "{ " + ", ".join(names) + " }"
        return f"meta l4proto {value}", lambda f: any(ok[n](f) for n in names)
    if kind == "icmp":
        name, number = draw(st.sampled_from([("echo-request", 128), ("echo-reply", 129)] if v6 else
                                            [("echo-request", 8), ("echo-reply", 0), ("time-exceeded", 11)]))
        return (f"{'icmpv6' if v6 else 'icmp'} type {name}",
                lambda f: f.family == (6 if v6 else 4) and f.icmp and f.icmp_type == number)
    if kind == "iface":  # a sent packet has an output device only, a received one an input device only:
        # nft reads the other one's name as ""
        key, neg = draw(st.sampled_from(["oifname", "iifname"])), draw(st.booleans())
        seen = "oifname" if direction == "egress" else "iifname"
        names = draw(st.lists(st.sampled_from(IFNAMES), min_size=1, max_size=2, unique=True))
        value = f'"{names[0]}"' if len(names) == 1 else "{ " + ", ".join(f'"{n}"' for n in names) + " }"
        return (f"{key} {'!= ' if neg else ''}{value}",
                lambda f: any(interface_matches(n, f.ifname if key == seen else "") for n in names) != neg)
    if kind == "nfproto":
        return f"meta nfproto {'ipv6' if v6 else 'ipv4'}", lambda f: f.family == (6 if v6 else 4)
    if kind == "length":
        n = draw(st.sampled_from([40, 60, 100]))
        return f"meta length > {n}", lambda f: f.length > n
    return "counter", lambda f: True


def _layers(text: str) -> tuple[bool, int | None]:
    """Whether a match names a transport protocol, and the IP version it implies."""
    l4 = text.startswith(("tcp ", "udp ", "icmp ", "icmpv6 ", "meta l4proto"))
    version = 4 if text.startswith(("ip ", "icmp ", "meta nfproto ipv4")) else \
        6 if text.startswith(("ip6 ", "icmpv6 ", "meta nfproto ipv6")) else None
    return l4, version


def _loadable(matches: list) -> list:
    """The matches nft loads together: one transport protocol and one IP version per rule
    (nft refuses `udp dport 53 icmpv6 type …`: conflicting protocols)."""
    kept, l4_seen, versions = [], False, set()
    for text, predicate in matches:
        l4, version = _layers(text)
        if l4 and l4_seen or version is not None and versions - {version}:
            continue
        l4_seen |= l4
        versions |= {version} - {None}
        kept.append((text, predicate))
    return kept


_VERDICTS = ["accept", "drop", "reject", "return", "continue", "counter", "jump", "goto"]


@st.composite
def _rule(draw, family: str, targets: list[str], unit: str | None, cgroups: bool):
    """A rule; without `cgroups` (on postrouting) neither socket matches nor reject, which nft
    allows on the prerouting, input and output hooks only."""
    matches = _loadable(draw(st.lists(nft_match(family), max_size=2)))
    texts, predicates = [m for m, _ in matches], [p for _, p in matches]
    if cgroups:  # the unit's own cgroup (holds), another's (never holds), or none
        which = draw(st.sampled_from([None, CGROUP, OTHER] if unit is None else [CGROUP]))
        if which is not None:
            texts.insert(0, f'socket cgroupv2 level 2 "{which}"')
            predicates.insert(0, (lambda f: True) if which == CGROUP else (lambda f: False))
    verdicts = [v for v in _VERDICTS if (targets or v not in ("jump", "goto")) and (cgroups or v != "reject")]
    verdict = draw(st.sampled_from(verdicts))  # "counter": a rule without a verdict
    target = draw(st.sampled_from(targets)) if verdict in ("jump", "goto") else None
    return MRule(texts, predicates, verdict, target, unit)


@st.composite
def rulesets(draw, other_hook: str | None = "input"):
    """1-2 tables, each with 1-2 base chains on output (and sometimes one on `other_hook`, which
    must not count) and 0-3 regular chains, and sometimes a table with a postrouting base chain
    (no socket matches there: nft has no socket on that hook); a regular chain jumps only to later
    ones (nft refuses loops). The unit's scnpm rules go at the ends of chains, and the first base
    chain gets one."""
    tables = []
    families = draw(st.lists(st.sampled_from(["inet", "ip", "ip6"]), min_size=1, max_size=2))
    for n, family in enumerate(families):
        hooks = ("output",)
        regular = [f"c{k}" for k in range(draw(st.integers(0, 3)))]
        bases = [MChain(f"b{k}", draw(st.sampled_from(hooks + (other_hook,) if k and other_hook else hooks)),
                        draw(st.sampled_from([-10, 0, 10])), draw(st.sampled_from([None, "accept", "drop"])))
                 for k in range(draw(st.integers(1, 2)))]
        chains = bases + [MChain(name) for name in regular]
        for chain in chains:
            targets = regular if chain.hook else regular[regular.index(chain.name) + 1:]
            chain.rules = draw(st.lists(_rule(family, targets, None, True), max_size=3))
            chain.rules += draw(st.lists(_rule(family, targets, UNIT, True), max_size=2))
        if n == 0:
            chain = bases[0]
            chain.hook = hooks[0]
            targets = regular
            chain.rules.append(draw(_rule(family, targets, UNIT, True)))
        for chain in chains:  # scnpm adds the unit's rules after the file's own
            chain.rules.sort(key=lambda r: r.unit is not None)
        tables.append(MTable(family, f"t{n}", chains))
    if draw(st.booleans()):
        family = draw(st.sampled_from(["inet", "ip", "ip6"]))
        regular = [f"c{k}" for k in range(draw(st.integers(0, 2)))]
        chains = [MChain("post", "postrouting", draw(st.sampled_from([-10, 0, 10])),
                         draw(st.sampled_from([None, "accept", "drop"])))] + [MChain(name) for name in regular]
        for chain in chains:
            targets = regular if chain.hook else regular[regular.index(chain.name) + 1:]
            chain.rules = draw(st.lists(_rule(family, targets, None, False), max_size=3))
        tables.append(MTable(family, "tp", chains))
    return tables
