"""Checked AST → nft chains (libnftables JSON), with the language's exact semantics.

Two steps:

1. `formula()` turns the expression, for one direction and the current param
   values, into a boolean formula over *atoms*. An atom is a list of nft matches
   that all succeed (the conjunction one nft rule can test). The language's
   rules live here: a number the packet lacks reads 0, so `dst_port < 5` becomes
   "not (ports present and dst_port >= 5)"; an address literal never equals the
   other family; two fields are compared byte by byte through tiny concatenated
   sets (nftables has no register-to-register comparison); $params are
   substituted and comparisons they put out of a field's range fold to constants.

2. `compile_chains()` (nft/chains.py) turns the formula into chains whose
   rules end in the unit's pass and drop actions.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from ..lang import ast
from ..lang.evaluator import evaluate
from ..lang.fields import FIELDS, resolve
from ..lang.packet import PacketFields
from ..lang.setcontents import contains, elements_intervals, merge
from ..nft import expr as X
from ..nft.chains import Chains, compile_chains
from ..nft.formula import FALSE, TRUE, Atom, Formula, and_, atom, not_, or_

# -- value sets: sorted disjoint inclusive intervals ---------------------------------

def clip(intervals, top: int) -> list[tuple[int, int]]:
    return merge((lo, min(hi, top)) for lo, hi in intervals if lo <= top and lo <= hi)


def complement(intervals, top: int) -> list[tuple[int, int]]:
    out, nxt = [], 0
    for lo, hi in intervals:
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt <= top:
        out.append((nxt, top))
    return out


def compare_values(op: str, c: int, top: int) -> list[tuple[int, int]]:
    """{v in 0..top : v op c}."""
    ranges = {
        "==": [(c, c)], "!=": [(0, c - 1), (c + 1, top)], "<": [(0, c - 1)], "<=": [(0, c)],
        ">": [(c + 1, top)], ">=": [(c, top)],
    }[op]
    return clip([(lo, hi) for lo, hi in ranges if lo <= hi], top)


_FLIP = {"==": "==", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}


def _holds(op: str, a: int, b: int) -> bool:
    return {"==": a == b, "!=": a != b, "<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op]


# -- packet fields in nft terms ---------------------------------------------------------

PORT_FIELDS = ("src_port", "dst_port")
ICMP_FIELDS = ("icmp_type", "icmp_code")
LEN_MAX = 2**32 - 1

# Ports exist for TCP and UDP when the first 4 bytes of the L4 header do: reading
# `th dport` (bytes 2-3) proves both; the transport header of a non-first fragment
# cannot be read at all. ICMP type/code exist when 2 bytes do.
PORTS_PRESENT = (
    X.match(X.meta("l4proto"), X.anon_set(["tcp", "udp"])),
    X.match(X.payload("th", "dport"), X.rng(0, 65535)),
)
ICMP_GUARD = X.match(X.concat(X.meta("nfproto"), X.meta("l4proto")),
                     X.anon_set([X.concat("ipv4", "icmp"), X.concat("ipv6", "ipv6-icmp")]))
ICMP_TWO_BYTES = X.match(X.raw("th", 8, 8), X.rng(0, 255))
ICMP_PRESENT = (ICMP_GUARD, ICMP_TWO_BYTES)

_VALUE = {
    "src_port": X.payload("th", "sport"), "dst_port": X.payload("th", "dport"),
    "icmp_type": X.raw("th", 0, 8), "icmp_code": X.raw("th", 8, 8), "len": X.meta("length"),
}
_BYTES = {
    "src_port": [X.raw("th", 0, 8), X.raw("th", 8, 8)],
    "dst_port": [X.raw("th", 16, 8), X.raw("th", 24, 8)],
    "icmp_type": [X.raw("th", 0, 8)],
    "icmp_code": [X.raw("th", 8, 8)],
}

_BOOL = {
    "ip": (X.match(X.meta("nfproto"), "ipv4"),),
    "ipv6": (X.match(X.meta("nfproto"), "ipv6"),),
    "tcp": (X.match(X.meta("l4proto"), "tcp"),),
    "udp": (X.match(X.meta("l4proto"), "udp"),),
    "icmp": (ICMP_GUARD,),
}

# Byte relations as anonymous concatenated sets: {x . x} and {x . x+1..255}.
EQ8 = X.anon_set([X.concat(x, x) for x in range(256)])
LT8 = X.anon_set([X.concat(x, X.rng(x + 1, 255)) for x in range(255)])


def top_of(name: str) -> int:
    return 2 ** FIELDS[name][1] - 1


def presence(name: str) -> tuple:
    if name in PORT_FIELDS:
        return PORTS_PRESENT
    if name in ICMP_FIELDS:
        return ICMP_PRESENT
    return ()


def guard(name: str) -> tuple:
    """What must accompany a match on the field's value: reading dst_port or icmp_code
    already proves the bytes before it exist."""
    if name == "dst_port":
        return PORTS_PRESENT[:1]
    if name == "icmp_code":
        return ICMP_PRESENT[:1]
    return presence(name)


def group(name: str) -> str:
    return "port" if name in PORT_FIELDS else "icmp" if name in ICMP_FIELDS else name


# Named-set key types: (nft datatype, the typed left-hand side, top value) by field.
# Sets used with `len` have no JSON-expressible type in nft 1.0.6 (`typeof meta length`
# cannot be written in JSON), so they are rendered inline and re-rendered on change.
SET_TYPES = {
    "port": "inet_service",
    "icmp_type": "icmp_type", "icmpv6_type": "icmpv6_type",
    "icmp_code": "icmp_code", "icmpv6_code": "icmpv6_code",
    "ipv4_addr": "ipv4_addr", "ipv6_addr": "ipv6_addr",
}


def set_elements(key_type: str, elements) -> list:
    """The nft elements (merged, clipped to the key type) of a named set's contents."""
    if key_type in ("ipv4_addr", "ipv6_addr"):
        version = 4 if key_type == "ipv4_addr" else 6
        nets = ipaddress.collapse_addresses(n for n in elements if n.version == version)
        return [_network(n) for n in nets]
    top = 65535 if key_type == "port" else 255
    return [lo if lo == hi else X.rng(lo, hi) for lo, hi in clip(elements_intervals(elements), top)]


def _network(net):
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return X.prefix(str(net.network_address), net.prefixlen)


def _addr_expr(version: int, name: str) -> dict:
    return X.payload("ip" if version == 4 else "ip6", name)


def _family(version: int) -> dict:
    return X.match(X.meta("nfproto"), "ipv4" if version == 4 else "ipv6")


# -- AST → formula -------------------------------------------------------------------

_NO_PACKET = PacketFields(4, None, False, 0, 0, 0, 0, 0, ipaddress.IPv4Address(0), ipaddress.IPv4Address(0))


def _has_field(node) -> bool:
    if isinstance(node, ast.Field):
        return True
    if isinstance(node, ast.Compare):
        return _has_field(node.left) or _has_field(node.right)
    if isinstance(node, ast.In):
        return _has_field(node.subject)
    return False


@dataclass
class Lowering:
    """One direction of one unit: turns AST nodes into formulas; records the named sets used."""
    direction: str
    params: dict = field(default_factory=dict)
    sets: dict = field(default_factory=dict)      # name -> elements (parse_set_elements form)
    set_name: object = None                       # (set, key_type) -> nft set name
    used_sets: dict = field(default_factory=dict)  # nft set name -> (set, key_type)

    def formula(self, node) -> Formula:
        # An explicit stack would only matter beyond the checker's 200 levels of nesting.
        if isinstance(node, ast.BoolConst):
            return TRUE if node.value else FALSE
        if isinstance(node, ast.Not):
            return not_(self.formula(node.operand))
        if isinstance(node, ast.And):
            return and_(*(self.formula(o) for o in node.operands))
        if isinstance(node, ast.Or):
            return or_(*(self.formula(o) for o in node.operands))
        if isinstance(node, (ast.Compare, ast.In)) and not _has_field(node):
            return TRUE if evaluate(node, _NO_PACKET, self.direction, self.params, self.sets) else FALSE
        if isinstance(node, ast.Compare):
            return self.compare(node)
        if isinstance(node, ast.In):
            return self.member(node)
        return Atom(_BOOL[self.field(node)])

    def field(self, node: ast.Field) -> str:
        return resolve(node.name, self.direction)

    def number(self, node) -> int:
        return node.value if isinstance(node, ast.NumLit) else self.params.get(node.name, 0)

    # interfaces: nft matches the device's name itself, a trailing '*' as a prefix match
    def interfaces(self, patterns) -> Formula:
        if "*" in patterns:
            return TRUE  # every packet has a device in the input and output hooks
        key = X.meta("iifname" if self.direction == "ingress" else "oifname")
        return or_(*(atom(X.match(key, p)) for p in patterns))

    # comparisons
    def compare(self, node: ast.Compare) -> Formula:
        left, right, op = node.left, node.right, node.op
        if self._is_interface(left):
            patterns = [n.value for n in (left, right) if isinstance(n, ast.StrLit)]
            hit = self.interfaces(patterns) if patterns else TRUE  # ifname == ifname
            return hit if op == "==" else not_(hit)
        if isinstance(left, ast.AddrLit) or isinstance(right, ast.AddrLit) or self._is_addr(left):
            eq = self.addr_equal(left, right)
            return eq if op == "==" else not_(eq)
        if isinstance(left, ast.Field) and isinstance(right, ast.Field):
            return self.relate(op, self.field(left), self.field(right))
        if not isinstance(left, ast.Field):
            left, right, op = right, left, _FLIP[op]
        name = self.field(left)
        top = top_of(name)
        return self.number_in(name, compare_values(op, min(self.number(right), top + 1), top))

    def _is_interface(self, node) -> bool:
        return isinstance(node, ast.StrLit) or isinstance(node, ast.Field) and FIELDS[self.field(node)][0] == "interface"

    def _is_addr(self, node) -> bool:
        return isinstance(node, ast.Field) and FIELDS[self.field(node)][0] == "address"

    def addr_equal(self, left, right) -> Formula:
        if isinstance(left, ast.AddrLit):
            left, right = right, left
        name = self.field(left)
        if isinstance(right, ast.AddrLit):  # a host literal: its own family only
            net = right.net
            return atom(X.match(_addr_expr(net.version, name), str(net.network_address)))
        other = self.field(right)
        if other == name:
            return TRUE
        # saddr == daddr: byte by byte, per family (raw offsets need the family guard).
        v4 = [_family(4)] + [X.match(X.concat(X.raw("nh", 96 + 8 * i, 8), X.raw("nh", 128 + 8 * i, 8)), EQ8)
                             for i in range(4)]
        v6 = [_family(6)] + [X.match(X.concat(X.raw("nh", 64 + 8 * i, 8), X.raw("nh", 192 + 8 * i, 8)), EQ8)
                             for i in range(16)]
        return or_(Atom(tuple(v4)), Atom(tuple(v6)))

    # membership
    def member(self, node: ast.In) -> Formula:
        name, box = self.field(node.subject), node.container
        if FIELDS[name][0] == "interface":
            return self.interfaces([item.value for item in box.items])
        if FIELDS[name][0] == "address":
            return self.addr_member(name, box)
        top = top_of(name)
        if isinstance(box, ast.SetRef):
            return self.number_set(name, box.name)
        items = [box] if isinstance(box, ast.Range) else box.items
        intervals = []
        for item in items:
            if isinstance(item, ast.Range):
                intervals.append((self.number(item.lo), self.number(item.hi)))
            else:
                v = self.number(item)
                intervals.append((v, v))
        return self.number_in(name, clip(merge(intervals), top))

    def addr_member(self, name: str, box) -> Formula:
        if isinstance(box, ast.SetRef):
            return or_(*(atom(X.match(_addr_expr(v, name), X.set_ref(self.use_set(box.name, kt))))
                         for v, kt in ((4, "ipv4_addr"), (6, "ipv6_addr"))))
        items = box.items if isinstance(box, ast.SetLit) else (box,)
        nets = [net for item in items for net in ast.networks(item)]
        parts = []
        for version in (4, 6):
            mine = list(ipaddress.collapse_addresses(n for n in nets if n.version == version))
            if not mine:
                continue
            if mine[0].prefixlen == 0:
                parts.append(atom(_family(version)))
                continue
            items = [_network(n) for n in mine]
            parts.append(atom(X.match(_addr_expr(version, name), items[0] if len(items) == 1 else X.anon_set(items))))
        return or_(*parts)

    def use_set(self, name: str, key_type: str) -> str:
        nft_name = self.set_name(name, key_type)
        self.used_sets[nft_name] = (name, key_type)
        return nft_name

    def number_set(self, name: str, set_name: str) -> Formula:
        contents = elements_intervals(self.sets.get(set_name, ()))
        if name == "len":
            intervals = clip(contents, LEN_MAX)
            return atom(X.match(X.meta("length"), X.intervals_value(intervals))) if intervals else FALSE
        zero = contains(contents, 0)
        if name in PORT_FIELDS:
            ref = X.set_ref(self.use_set(set_name, "port"))
            hit = Atom(guard(name) + (X.match(_VALUE[name], ref),))
            return or_(hit, not_(Atom(PORTS_PRESENT))) if zero else hit
        what = name.split("_")[1]  # type | code
        hits = []
        for proto, key_type in (("icmp", f"icmp_{what}"), ("icmpv6", f"icmpv6_{what}")):
            family = "ipv4" if proto == "icmp" else "ipv6"
            l4 = "icmp" if proto == "icmp" else "ipv6-icmp"
            ref = X.set_ref(self.use_set(set_name, key_type))
            hits.append(atom(X.match(X.meta("nfproto"), family), X.match(X.meta("l4proto"), l4),
                             X.match(X.payload(proto, what), ref), ICMP_TWO_BYTES))
        hit = or_(*hits)
        return or_(hit, not_(Atom(ICMP_PRESENT))) if zero else hit

    # numbers
    def number_in(self, name: str, intervals) -> Formula:
        """`name` (absent reads 0) lies in `intervals` (already clipped to its range)."""
        top = top_of(name)
        if not intervals:
            return FALSE
        if intervals == [(0, top)]:
            return TRUE
        if name == "len":
            return atom(X.match(_VALUE[name], X.intervals_value(intervals)))
        if contains(intervals, 0):  # an absent field matches: say when it does not
            return not_(Atom(guard(name) + (X.match(_VALUE[name], X.intervals_value(complement(intervals, top))),)))
        return Atom(guard(name) + (X.match(_VALUE[name], X.intervals_value(intervals)),))

    def present_in(self, name: str, intervals) -> Formula:
        """`name` is present and lies in `intervals`."""
        if not intervals:
            return FALSE
        if intervals == [(0, top_of(name))]:
            return Atom(presence(name))
        return Atom(guard(name) + (X.match(_VALUE[name], X.intervals_value(intervals)),))

    def relate(self, op: str, left: str, right: str) -> Formula:
        """Two different fields compared; absent ones read 0."""
        if left == right:
            return TRUE if _holds(op, 0, 0) else FALSE
        zero_zero = TRUE if _holds(op, 0, 0) else FALSE
        gl, gr = group(left), group(right)
        if gl == gr:  # both present or both absent
            present = Atom(presence(left))
            return or_(and_(present, lex(op, _BYTES[left], _BYTES[right])), and_(not_(present), zero_zero))
        if "len" in (gl, gr):
            other = right if gl == "len" else left
            present = Atom(presence(other))
            absent_case = (self.number_in("len", compare_values(op, 0, LEN_MAX)) if gl == "len"
                           else self.number_in("len", compare_values(_FLIP[op], 0, LEN_MAX)))
            return or_(and_(present, len_relation(op, gl == "len", other)), and_(not_(present), absent_case))
        # ports against ICMP fields: never both present
        return or_(self.present_in(left, compare_values(op, 0, top_of(left))),
                   self.present_in(right, compare_values(_FLIP[op], 0, top_of(right))),
                   and_(not_(Atom(presence(left))), not_(Atom(presence(right))), zero_zero))


def lex(op: str, a: list, b: list) -> Formula:
    """Big-endian byte strings a op b, from byte-pair lookups in EQ8 and LT8."""
    def eq(x, y):
        return Atom(tuple(X.match(X.concat(p, q), EQ8) for p, q in zip(x, y, strict=False)))

    def lt(x, y):
        return or_(*(Atom(tuple(X.match(X.concat(p, q), EQ8) for p, q in zip(x[:i], y[:i], strict=False))
                          + (X.match(X.concat(x[i], y[i]), LT8),)) for i in range(len(x))))

    return {"==": lambda: eq(a, b), "!=": lambda: not_(eq(a, b)), "<": lambda: lt(a, b),
            ">": lambda: lt(b, a), "<=": lambda: not_(lt(b, a)), ">=": lambda: not_(lt(a, b))}[op]()


def len_relation(op: str, len_left: bool, other: str) -> Formula:
    """`len op other` (or `other op len`) for a present 8- or 16-bit field."""
    length = X.meta("length")
    if other in PORT_FIELDS:
        small, len_bytes = 65535, [X.shr(length, 8), X.band(length, 255)]
    else:
        small, len_bytes = 255, [length]
    fits = atom(X.match(length, X.rng(0, small)))
    bigger = atom(X.match(length, X.rng(small + 1, LEN_MAX)))
    big_holds = op in ((">", ">=", "!=") if len_left else ("<", "<=", "!="))
    rel = lex(op, len_bytes, _BYTES[other]) if len_left else lex(op, _BYTES[other], len_bytes)
    return or_(and_(fits, rel), and_(bigger, TRUE if big_holds else FALSE))


# -- formula → chains ------------------------------------------------------------------

# -- one direction of a unit ---------------------------------------------------------------

@dataclass
class Lowered:
    chains: Chains
    sets: dict  # nft set name -> (language set name, key type)


@dataclass(frozen=True)
class Log:
    """Drop events: at most `rate` a second (`burst` at once) to nflog group `group`."""
    group: int
    rate: int
    burst: int


def drop_rules(direction: str, names, mode: str, log: Log) -> list[list]:
    """What a packet the filter refuses meets, with events on: counted as a drop; over the
    rate limit, counted as lost (never silently) and not logged; else logged with a prefix
    naming the unit, direction and verdict. Then the mode's verdict."""
    verdict = X.DROP if mode == "enforce" else X.ACCEPT
    return [
        [X.counter(names.counter(direction, "drop")), X.limit_over(log.rate, log.burst),
         X.counter(names.counter(direction, "lost")), verdict],
        [X.log_group(log.group, names.log_prefix(direction, "drop" if mode == "enforce" else "audit")), verdict],
    ]


def lower(checked_expr, direction: str, names, mode: str = "enforce", params: dict | None = None,
          sets: dict | None = None, log: Log | None = None) -> Lowered:
    """The chains of one direction. `names` is a bpfwall.nft.names.UnitNames; `log` (None, or
    a rate of 0: no events) puts the drop path in a chain of its own (drop_rules)."""
    lowering = Lowering(direction, dict(params or {}), dict(sets or {}), names.set)
    f = lowering.formula(checked_expr)
    on_true = [X.counter(names.counter(direction, "pass")), X.ACCEPT]
    on_false = [X.counter(names.counter(direction, "drop")), X.DROP if mode == "enforce" else X.ACCEPT]
    false_rules = drop_rules(direction, names, mode, log) if log is not None and log.rate > 0 else None
    chains = compile_chains(f, lambda i: names.chain(direction, i), on_true, on_false, false_rules)
    return Lowered(chains, lowering.used_sets)


def explain(checked_expr, direction: str, names, mode: str = "enforce", params=None, sets=None,
            log: Log | None = None) -> str:
    """The chains as nft text."""
    low = lower(checked_expr, direction, names, mode, params, sets, log)
    out = []
    for name in low.chains.names:
        out.append(f'chain "{name}" {{')
        out.extend("\t" + X.rule_text(r) for r in low.chains.rules[name])
        out.append("}")
    return "\n".join(out)
