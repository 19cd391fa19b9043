"""Formula → nft chains: rules that send each packet to the unit's pass or drop action.

A match that cannot be evaluated (a port of an ICMP packet, a header cut short)
makes nft skip the rule, so a rule can only *divert* control when its atom
holds; negation is never written as an nft `!=`, it swaps the two exits
instead. Pass and drop end in accept/drop (each cgroup level has a base chain
of its own, see nft/layout.py), so sub-expressions can live in chains that are
`jump`ed to and `return` to continue. The rule count is linear in the formula;
the chain depth is planned to be small and checked against the kernel's limit.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import expr as X
from .errors import NftError
from .formula import FALSE, TRUE, And, Atom, Const, Formula, Not, Or, and_, nnf, or_


# The kernel validates chain links up to NFT_JUMP_STACK_SIZE (16): the base chain
# is level 0 and the unit's entry chain level 1, so chains may reach level 15.
MAX_CHAIN_LEVEL = 15


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
    """The matches of several atoms as one rule, duplicates and implied matches dropped; None
    when no packet can satisfy them all (two families, two L4 protocols): nft refuses some such
    rules ("conflicting protocols specified: ip vs. ip6"), and all of them never match."""
    seen, out, possible = set(), [], _PAIRS
    for a in atoms:
        for m in a.matches:
            k = X.key(m)
            if k not in seen:
                seen.add(k)
                out.append(m)
                possible = possible & _allows(m)
    return simplify(out) if possible else None


_PROTOCOL_KEYS = (X.meta("nfproto"), X.meta("l4proto"), X.concat(X.meta("nfproto"), X.meta("l4proto")))
# Bits of the transport header a named field reads: (offset, length).
_TH_FIELDS = {"sport": (0, 16), "dport": (16, 16), "type": (0, 8), "code": (8, 8)}
_TH_PROTOCOLS = ("th", "tcp", "udp", "icmp", "icmpv6")


def _th_end(e) -> int:
    """How many bits of the transport header reading expression e proves present (0: none)."""
    if isinstance(e, list):
        return max((_th_end(x) for x in e), default=0)
    if not isinstance(e, dict):
        return 0
    body = e.get("payload")
    if body is not None:
        if body.get("base") == "th":
            return body["offset"] + body["len"]
        if body.get("protocol") in _TH_PROTOCOLS and body.get("field") in _TH_FIELDS:
            return sum(_TH_FIELDS[body["field"]])
        return 0
    return max((_th_end(v) for v in e.values()), default=0)


def _read_bits(left) -> tuple[int, int] | None:
    """(offset, length) in bits of a transport-header read, else None."""
    read = left.get("payload") if isinstance(left, dict) else None
    if not read:
        return None
    if read.get("base") == "th":
        return read["offset"], read["len"]
    if read.get("protocol") in _TH_PROTOCOLS:
        return _TH_FIELDS.get(read.get("field"))
    return None


def _presence_only(m) -> int:
    """The header bits a match only proves present (it accepts every value it reads), else 0."""
    body = m["match"]
    bits = _read_bits(body["left"])
    right = body["right"]
    if body["op"] != "==" or bits is None or not (isinstance(right, dict) and "range" in right):
        return 0
    return sum(bits) if right["range"] == [0, 2 ** bits[1] - 1] else 0


def _narrowed(m, possible: frozenset):
    """A protocol set match as one compare when the other protocol matches leave it a single
    value: `meta nfproto ipv4` makes `meta nfproto . meta l4proto { ipv4 . icmp, ipv6 . ipv6-icmp }`
    just `meta l4proto icmp` (a compare instead of a set lookup)."""
    left, right = m["match"]["left"], m["match"]["right"]
    if not (isinstance(right, dict) and "set" in right):
        return m
    pairs = _allows(m) & possible
    l4s = {p[1] for p in pairs}
    if left == X.meta("l4proto") and len(l4s) == 1 and None not in l4s:
        return X.match(left, l4s.pop())
    if left == X.concat(X.meta("nfproto"), X.meta("l4proto")) and len(pairs) == 1:
        (family, l4), = pairs
        if {p[0] for p in possible} == {family}:
            return X.match(X.meta("l4proto"), l4)
    return m


def simplify(matches: list) -> list:
    """The same conjunction with fewer matches: a protocol match (meta nfproto / l4proto) the
    other protocol matches imply goes (`meta l4proto udp` makes `meta l4proto { tcp, udp }`
    redundant), and so does a presence guard (`th dport 0-65535`) another match's read already
    proves; a remaining guard goes last, after the matches that decide most packets. The same
    packets match: each match is a test of its own (a missing header fails it), so their order
    does not matter."""
    out = list(matches)
    for m in list(out):
        if m["match"]["left"] not in _PROTOCOL_KEYS:
            continue
        others = [o for o in out if o is not m]
        possible = _PAIRS
        for o in others:
            if o["match"]["left"] in _PROTOCOL_KEYS:
                possible = possible & _allows(o)
        if possible <= _allows(m):
            out = others
        else:
            out = [_narrowed(o, possible) if o is m else o for o in out]
    guards = [m for m in out if _presence_only(m)]
    rest = [m for m in out if not _presence_only(m)]
    proven = max((_th_end(m["match"]["left"]) for m in rest), default=0)
    widest = max(guards, key=_presence_only, default=None)
    return rest + ([widest] if widest is not None and _presence_only(widest) > proven else [])


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
            self.out.add(chain, simplify(list(f.matches)) + list(t.actions))
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
            self.out.add(chain, simplify(list(a.matches)) + list(decide.actions))
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


# Up to this many rules replace a jump to a chain of its own (see _flatten).
MAX_DISTRIBUTED = 8


def _flatten(f: Formula) -> Formula:
    """An NNF formula with fewer chain jumps: `p && (a || b)` (atoms) would need a jumped chain
    for the Or; as `p && a || p && b` it is one rule per atom in the same chain. Likewise,
    mirrored, `!p || !a && !b`. Only where the And (Or) has nothing else nested, and few atoms."""
    if not isinstance(f, (And, Or)):
        return f
    operands = [_flatten(o) for o in f.operands]
    conjunction = isinstance(f, And)
    inner_cls = Or if conjunction else And
    shared = [literal_of(o, conjunction) for o in operands if literal_of(o, conjunction) is not None]
    nested = [o for o in operands if not isinstance(o, (Atom, Not))]
    keep = [o for o in operands if o not in nested and literal_of(o, conjunction) is None]
    if (shared and len(nested) == 1 and isinstance(nested[0], inner_cls)
            and len(nested[0].operands) <= MAX_DISTRIBUTED
            and all(literal_of(o, conjunction) is not None for o in nested[0].operands)):
        parts = []
        for o in nested[0].operands:
            rule = _conj(shared + [literal_of(o, conjunction)])
            if rule is None:  # no packet: FALSE in the Or (TRUE in the And)
                continue
            a = Atom(tuple(rule))
            parts.append(a if conjunction else Not(a))
        if not parts:
            return and_(*keep, FALSE) if conjunction else or_(*keep, TRUE)
        inner = or_(*parts) if conjunction else and_(*parts)
        return and_(*keep, inner) if conjunction else or_(*keep, inner)
    return and_(*operands) if conjunction else or_(*operands)


def literal_of(o, conjunction: bool):
    """The atom of a literal that decides like a plain atom in an And (an Atom) or in an Or
    (a Not(Atom)); None for anything else."""
    if conjunction:
        return o if isinstance(o, Atom) else None
    return o.operand if isinstance(o, Not) and isinstance(o.operand, Atom) else None


def compile_chains(f: Formula, chain_name, on_true: list, on_false: list, false_rules: list | None = None) -> Chains:
    """Chains for formula f; chain_name(i) names the i-th chain (0: the entry); on_true and
    on_false are terminal (they end with accept or drop). `false_rules` (terminal too): the
    rules of a chain of their own that on_false (then a goto to it) leads to — more than one
    rule's worth of statements, e.g. log some packets and count the others (chain 1)."""
    c = _Compiler(chain_name)
    entry = c.new_chain()
    if false_rules:
        target = c.new_chain()
        for rule in false_rules:
            c.out.add(target, rule)
        on_false = [X.goto(target)]
    c.gen(_flatten(nnf(f)), Exit(tuple(on_true), True), Exit(tuple(on_false), True), entry)
    levels = 1 + c.out.depth()
    if levels > MAX_CHAIN_LEVEL:
        raise NftError(f"this expression needs {levels} levels of nft chains; the kernel allows "
                       f"{MAX_CHAIN_LEVEL} (simplify the nesting of || inside && inside ||, or use the bpf backend)")
    return c.out
