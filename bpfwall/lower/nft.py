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

2. `compile_chains()` turns the formula into chains. A match that cannot be
   evaluated (a port of an ICMP packet, a header cut short) makes nft skip the
   rule, so a rule can only *divert* control when its atom holds; negation is
   therefore never written as an nft `!=`, it swaps the two exits instead. The
   unit's pass and drop actions end in accept/drop: each cgroup level has a base
   chain of its own, so an accept ends only that level's evaluation and the next
   level's units still run, as every cgroup_skb program on a cgroup's path runs.
   Both being terminal, sub-expressions can live in chains that are `jump`ed to
   and `return` to continue. The rule count is linear in the expression; the
   chain depth is planned to be small and checked against the kernel's limit.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from ..lang import ast
from ..lang.evaluator import evaluate
from ..lang.fields import FIELDS, resolve
from ..lang.packet import PacketFields
from ..nft import expr as X
from ..nft.errors import NftError

# The kernel validates chain links up to NFT_JUMP_STACK_SIZE (16): the base chain
# is level 0 and the unit's entry chain level 1, so chains may reach level 15.
MAX_CHAIN_LEVEL = 15

# -- formulas -------------------------------------------------------------------


class Formula:
    __slots__ = ()


@dataclass(frozen=True, eq=False)
class Const(Formula):
    value: bool


@dataclass(frozen=True, eq=False)
class Atom(Formula):
    """Holds when every match holds (and none meets a missing header)."""
    matches: tuple


@dataclass(frozen=True, eq=False)
class Not(Formula):
    operand: Formula


@dataclass(frozen=True, eq=False)
class And(Formula):
    operands: tuple


@dataclass(frozen=True, eq=False)
class Or(Formula):
    operands: tuple


TRUE, FALSE = Const(True), Const(False)


def atom(*matches) -> Atom:
    return Atom(tuple(matches))


def not_(f: Formula) -> Formula:
    if isinstance(f, Const):
        return FALSE if f.value else TRUE
    if isinstance(f, Not):
        return f.operand
    return Not(f)


def _junction(cls, unit: Const, operands) -> Formula:
    out = []
    for f in operands:
        if isinstance(f, cls):
            out.extend(f.operands)
        elif isinstance(f, Const):
            if f.value != unit.value:
                return f  # FALSE in an And, TRUE in an Or
        else:
            out.append(f)
    if not out:
        return unit
    return out[0] if len(out) == 1 else cls(tuple(out))


def and_(*fs) -> Formula:
    return _junction(And, TRUE, fs)


def or_(*fs) -> Formula:
    return _junction(Or, FALSE, fs)


# -- value sets: sorted disjoint inclusive intervals ---------------------------------

def merge(intervals) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]


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


def contains(intervals, value: int) -> bool:
    return any(lo <= value <= hi for lo, hi in intervals)


def compare_values(op: str, c: int, top: int) -> list[tuple[int, int]]:
    """{v in 0..top : v op c}."""
    ranges = {
        "==": [(c, c)], "!=": [(0, c - 1), (c + 1, top)], "<": [(0, c - 1)], "<=": [(0, c)],
        ">": [(c + 1, top)], ">=": [(c, top)],
    }[op]
    return clip([(lo, hi) for lo, hi in ranges if lo <= hi], top)


def elements_intervals(elements) -> list[tuple[int, int]]:
    """Number-set elements as values.parse_set_elements gives them: ints and (lo, hi)."""
    return merge((e, e) if isinstance(e, int) else (e[0], e[1]) for e in elements)


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

    # comparisons
    def compare(self, node: ast.Compare) -> Formula:
        left, right, op = node.left, node.right, node.op
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
        nets = [box.net] if isinstance(box, ast.AddrLit) else [i.net for i in box.items]
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
        return Atom(tuple(X.match(X.concat(p, q), EQ8) for p, q in zip(x, y)))

    def lt(x, y):
        return or_(*(Atom(tuple(X.match(X.concat(p, q), EQ8) for p, q in zip(x[:i], y[:i]))
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

def nnf(f: Formula, negate: bool = False) -> Formula:
    """Negation pushed down to atoms (De Morgan); And/Or flattened."""
    if isinstance(f, Const):
        return Const(f.value != negate)
    if isinstance(f, Atom):
        return Not(f) if negate else f
    if isinstance(f, Not):
        return nnf(f.operand, not negate)
    children = [nnf(o, negate) for o in f.operands]
    conjunction = isinstance(f, And) != negate
    return and_(*children) if conjunction else or_(*children)


_PAIRS = frozenset((l3, l4) for l3 in ("ipv4", "ipv6") for l4 in ("tcp", "udp", "icmp", "ipv6-icmp", None))
_HEADER_PAIRS = {"ip": "ipv4", "ip6": "ipv6", "icmp": ("ipv4", "icmp"), "icmpv6": ("ipv6", "ipv6-icmp")}


def _allows(m) -> frozenset:
    """The (family, L4 protocol) pairs a match leaves possible (all, for what it does not restrict)."""
    body = m["match"]
    left, right = body["left"], body["right"]
    values = right["set"] if isinstance(right, dict) and "set" in right else [right]
    if left == X.meta("nfproto"):
        return frozenset(p for p in _PAIRS if p[0] in values)
    if left == X.meta("l4proto"):
        return frozenset(p for p in _PAIRS if p[1] in values)
    if left == X.concat(X.meta("nfproto"), X.meta("l4proto")):
        return frozenset(tuple(v["concat"]) for v in values)
    protocol = left.get("payload", {}).get("protocol") if isinstance(left, dict) else None
    need = _HEADER_PAIRS.get(protocol)
    if isinstance(need, str):
        return frozenset(p for p in _PAIRS if p[0] == need)
    if need is not None:
        return frozenset([need])
    return _PAIRS


def _conj(atoms) -> list | None:
    """The matches of several atoms as one rule, duplicates dropped; None when no packet can
    satisfy them all (two families, two L4 protocols): nft refuses some such rules
    ("conflicting protocols specified: ip vs. ip6"), and all of them never match."""
    seen, out, possible = set(), [], _PAIRS
    for a in atoms:
        for m in a.matches:
            k = X.key(m)
            if k not in seen:
                seen.add(k)
                out.append(m)
                possible = possible & _allows(m)
    return out if possible else None


@dataclass
class Chains:
    """Rules per chain, in creation order; the first chain is the entry."""
    names: list = field(default_factory=list)
    rules: dict = field(default_factory=dict)

    def new(self, name: str) -> str:
        self.names.append(name)
        self.rules[name] = []
        return name

    def add(self, chain: str, rule: list) -> None:
        self.rules[chain].append(list(rule))

    def targets(self, name: str) -> list[str]:
        out = []
        for rule in self.rules[name]:
            verdict = rule[-1] if rule else {}
            for kind in ("goto", "jump"):
                if kind in verdict:
                    out.append(verdict[kind]["target"])
        return out

    def depth(self) -> int:
        """Chain links on the longest path from the entry chain (0: one chain); the graph is acyclic."""
        if not self.names:
            return 0
        memo: dict[str, int] = {}
        stack = [(self.names[0], False)]
        while stack:
            name, done = stack.pop()
            if name in memo:
                continue
            if done:
                memo[name] = max((1 + memo[t] for t in self.targets(name)), default=0)
                continue
            stack.append((name, True))
            stack.extend((t, False) for t in self.targets(name) if t not in memo)
        return memo[self.names[0]]


@dataclass(frozen=True)
class Exit:
    """Where a decision sends the packet: statements ending in a verdict. A global exit
    (the unit's pass/drop actions, both terminal) is valid in any chain; `return` and a
    `goto` to a continuation are valid only in the frame (jumped-to chain and the chains
    it reaches by goto) they were made for."""
    actions: tuple
    is_global: bool


_RET = Exit((X.RETURN,), False)


class _Compiler:
    """Emits rules for a formula in NNF (Not only on atoms; And/Or flattened).

    In an And, each negated atom that holds decides false, and the plain atoms
    together form the last rule (true); every other operand (an Or) must let
    the evaluation continue when it holds. Or is the mirror image. Such an
    operand goes into a chain of its own: `jump`ed to, returning to continue,
    when its other exit is global (this costs one level for that operand only);
    otherwise inline, with a `goto` to a continuation chain for what follows
    (each such operand adds a level to everything after it). `cost` is the
    chain depth a choice needs; the last operand is chosen to minimize it.
    """

    def __init__(self, chain_name):
        self.chain_name = chain_name
        self.out = Chains()
        self.memo: dict = {}

    def new_chain(self) -> str:
        return self.out.new(self.chain_name(len(self.out.names)))

    # planning
    @staticmethod
    def parts(f):
        plain = [o for o in f.operands if isinstance(o, Atom)]
        negated = [o.operand for o in f.operands if isinstance(o, Not)]
        nested = [o for o in f.operands if not isinstance(o, (Atom, Not))]
        return plain, negated, nested

    def cost(self, f, t_global: bool, e_global: bool) -> int:
        if not isinstance(f, (And, Or)):
            return 0
        return self.plan(f, t_global, e_global)[0]

    def plan(self, f, t_global: bool, e_global: bool):
        """(depth, nested operands in emission order, index of the inline tail or None, jump?)"""
        key = (id(f), t_global, e_global)
        if key in self.memo:
            return self.memo[key]
        conjunction = isinstance(f, And)
        plain, negated, nested = self.parts(f)
        last = plain if conjunction else negated  # the atoms of the final rule
        side_global = e_global if conjunction else t_global
        # exits of a nested operand: jumped (continue = return) or inline (continue = goto)
        jump_flags = (False, e_global) if conjunction else (t_global, False)
        inline_flags = jump_flags

        def one(c):
            return 1 + self.cost(c, *jump_flags) if side_global else self.cost(c, *inline_flags)

        candidates = [None] if last or not nested else (
            range(len(nested)) if len(nested) <= 32 else [max(range(len(nested)),
                                                               key=lambda i: self.cost(nested[i], t_global, e_global))])
        best = None
        for tail in candidates:
            rest = [c for i, c in enumerate(nested) if i != tail]
            tail_cost = 0 if tail is None else self.cost(nested[tail], t_global, e_global)
            if side_global:
                depth = max([one(c) for c in rest] + [tail_cost])
            else:  # continuations in sequence
                depth, level = 0, 0
                for c in rest:
                    depth = max(depth, level + one(c))
                    level += one(c) + 1
                depth = max(depth, level + tail_cost)
            if best is None or depth < best[0]:
                order = rest + ([nested[tail]] if tail is not None else [])
                best = (depth, order, None if tail is None else len(order) - 1, side_global)
        self.memo[key] = best
        return best

    # emission
    def gen(self, f: Formula, t: Exit, e: Exit, chain: str) -> None:
        """Rules in `chain`, closed by an unconditional exit, sending f's packets to t, others to e."""
        if isinstance(f, Const):
            self.out.add(chain, (t if f.value else e).actions)
        elif isinstance(f, Atom):
            self.out.add(chain, list(f.matches) + list(t.actions))
            self.out.add(chain, e.actions)
        elif isinstance(f, Not):
            self.gen(f.operand, e, t, chain)
        else:
            self.junction(f, t, e, chain)

    def junction(self, f, t: Exit, e: Exit, chain: str) -> None:
        conjunction = isinstance(f, And)
        decide, final = (e, t) if conjunction else (t, e)
        plain, negated, _ = self.parts(f)
        _, order, tail, jumped = self.plan(f, t.is_global, e.is_global)
        early, last = (negated, plain) if conjunction else (plain, negated)
        for a in early:
            self.out.add(chain, list(a.matches) + list(decide.actions))
        for i, sub in enumerate(order):
            if i == tail:
                self.gen(sub, t, e, chain)
                return
            if jumped:
                target = self.new_chain()
                self.gen(sub, _RET, e, target) if conjunction else self.gen(sub, t, _RET, target)
                self.out.add(chain, [X.jump(target)])
            else:
                nxt = self.new_chain()
                go = Exit((X.goto(nxt),), False)
                self.gen(sub, go, e, chain) if conjunction else self.gen(sub, t, go, chain)
                chain = nxt
        rule = _conj(last) if last else None
        if rule is not None:
            self.out.add(chain, rule + list(final.actions))
        self.out.add(chain, decide.actions if last else final.actions)


def compile_chains(f: Formula, chain_name, on_true: list, on_false: list) -> Chains:
    """Chains for formula f; chain_name(i) names the i-th chain (0: the entry); on_true and
    on_false are terminal (they end with accept or drop)."""
    c = _Compiler(chain_name)
    entry = c.new_chain()
    c.gen(nnf(f), Exit(tuple(on_true), True), Exit(tuple(on_false), True), entry)
    levels = 1 + c.out.depth()
    if levels > MAX_CHAIN_LEVEL:
        raise NftError(f"this expression needs {levels} levels of nft chains; the kernel allows "
                       f"{MAX_CHAIN_LEVEL} (simplify the nesting of || inside && inside ||, or use the bpf backend)")
    return c.out


# -- one direction of a unit ---------------------------------------------------------------

@dataclass
class Lowered:
    chains: Chains
    sets: dict  # nft set name -> (language set name, key type)


def lower(checked_expr, direction: str, names, mode: str = "enforce", params: dict | None = None,
          sets: dict | None = None) -> Lowered:
    """The chains of one direction. `names` is a bpfwall.nft.names.UnitNames."""
    lowering = Lowering(direction, dict(params or {}), dict(sets or {}), names.set)
    f = lowering.formula(checked_expr)
    on_true = [X.counter(names.counter(direction, "pass")), X.ACCEPT]
    on_false = [X.counter(names.counter(direction, "drop")), X.DROP if mode == "enforce" else X.ACCEPT]
    chains = compile_chains(f, lambda i: names.chain(direction, i), on_true, on_false)
    return Lowered(chains, lowering.used_sets)


def explain(checked_expr, direction: str, names, mode: str = "enforce", params=None, sets=None) -> str:
    """The chains as nft text."""
    low = lower(checked_expr, direction, names, mode, params, sets)
    out = []
    for name in low.chains.names:
        out.append(f'chain "{name}" {{')
        out.extend("\t" + X.rule_text(r) for r in low.chains.rules[name])
        out.append("}")
    return "\n".join(out)
