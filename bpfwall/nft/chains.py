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
from .formula import And, Atom, Const, Formula, Not, Or, nnf


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
