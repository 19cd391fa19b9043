"""nft's control flow for one unit's packets, folded into one bpfwall expression per direction.

On a hook, a packet passes every base chain there in priority order: a drop in any of them
ends it, an accept ends only that chain (the next base chain still judges the packet). So the
packet passes iff every base chain accepts it, and the direction's expression is the
conjunction of the base chains' expressions (priority changes which drop counts, not whether).

In a chain the rules run in order; when all of a rule's matches hold: accept accepts;
drop and reject drop; `jump X` runs X and, if X ends without a verdict (falls off its end or
`return`s), the rule after the jump runs next; `goto X` runs X instead of the rest of this
chain, so if X ends without a verdict this chain's caller continues (for a base chain: its
policy decides); `return` ends this chain as falling off its end does; continue, counter,
log and comment decide nothing. A base chain that ends without a verdict gives its policy
(accept when it declares none). A chain in an `ip` (`ip6`) table sees IPv4 (IPv6) only.

The unit's packets are those of its cgroup: `socket cgroupv2 level N "P"` holds for them iff P
is the cgroup's ancestor at level N (the cgroup itself when N is its depth). Every rule a packet
can reach is translated; one that cannot be (an interface, conntrack, …) refuses the whole
direction with its line, since leaving it out would change what the others mean.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..lang.parser import MAX_TEXT
from .ruleset import Chain, Rule, Ruleset
from .translate import Translation, Untranslatable, translate

# The hooks a unit's own packets pass: sent ones output then postrouting, received ones
# prerouting then input.
HOOKS = {"egress": ("output", "postrouting"), "ingress": ("prerouting", "input")}
FAMILY_GUARD = {"ip": "ip", "ip6": "ipv6", "inet": None}   # which packets a table's chains see
SOCKET_HOOKS = ("prerouting", "input", "output")  # where nft's socket expression and reject work
MAX_DEPTH = 16          # the kernel's jump stack (NFT_JUMP_STACK_SIZE)
MAX_EXPRESSION = MAX_TEXT  # the language's limit; jumps copy what follows them into each way out of a chain

TRUE, FALSE = "true", "false"


class Refused(Untranslatable):
    """A rule on the unit's path that has no exact translation; `line` is the rule's."""

    def __init__(self, line: int, why: str):
        super().__init__(why)
        self.line = line


def ite(cond: str, then: str, other: str) -> str:
    """`cond ? then : other` in the language, with constants folded."""
    if cond == TRUE or then == other:
        return then
    if cond == FALSE:
        return other
    if (then, other) == (TRUE, FALSE):
        return cond
    if (then, other) == (FALSE, TRUE):
        return f"!({cond})"
    if then == TRUE:
        return f"({cond}) || ({other})"
    if then == FALSE:
        return f"!({cond}) && ({other})"
    if other == TRUE:
        return f"!({cond}) || ({then})"
    if other == FALSE:
        return f"({cond}) && ({then})"
    return f"({cond}) && ({then}) || !({cond}) && ({other})"


@dataclass(frozen=True, eq=False)
class Branch:
    """`cond ? then : other` before it is written out: what follows a jump is shared, not copied,
    until `text` writes it, once per way it is reached."""
    cond: str
    then: object     # Branch | TRUE | FALSE
    other: object


def branch(cond: str, then, other):
    if cond == TRUE or then is other or then == other:
        return then
    return other if cond == FALSE else Branch(cond, then, other)


class TooLarge(Exception):
    pass


def text(node, known: dict | None = None, budget: list | None = None) -> str:
    """The expression of a Branch tree. A condition already decided on the way down (the same
    rule condition tested again, as `oifname X jump` then `oifname X reject` do) takes its branch.
    TooLarge past MAX_EXPRESSION characters, or past as many steps (shared continuations that
    fold to little text can still be visited exponentially often)."""
    if not isinstance(node, Branch):
        return node
    known, budget = known or {}, budget or [MAX_EXPRESSION]
    budget[0] -= 1
    if budget[0] < 0:
        raise TooLarge
    if node.cond in known:
        return text(node.then if known[node.cond] else node.other, known, budget)
    then = text(node.then, {**known, node.cond: True}, budget)
    other = text(node.other, {**known, node.cond: False}, budget)
    out = ite(node.cond, then, other)
    if len(out) > MAX_EXPRESSION:
        raise TooLarge
    return out


def cgroup_match(words: list[str]) -> tuple[int, str] | None:
    """The (level, path) of a `socket cgroupv2 level N [==] "PATH"` among a rule's words."""
    for k in range(len(words) - 4):
        if words[k:k + 3] == ["socket", "cgroupv2", "level"] and words[k + 3].isdigit():
            path = words[k + 5] if words[k + 4] == "==" and k + 5 < len(words) else words[k + 4]
            if path.startswith('"'):
                return int(words[k + 3]), path.strip('"')
    return None


@dataclass
class Flow:
    """One unit's view of a ruleset: its cgroup, and the translation of each of its own rules
    (None for a rule left out, already reported)."""
    ruleset: Ruleset
    unit: str
    cgroup: str | None
    own: dict[int, Translation | None]
    policies: dict[tuple, str] = field(default_factory=dict)   # base chain key -> policy that replaces its own
    sets: dict[str, tuple] = field(default_factory=dict)       # bpfwall name -> (kind, nft name, family, table)
    notes: dict[str, list[int]] = field(default_factory=dict)
    hook: str | None = None                                    # of the base chain being followed
    going: str = "egress"                                      # the direction being followed

    def bases(self, direction: str) -> list[Chain]:
        hooks = HOOKS[direction]
        for chain in self.ruleset.chains.values():
            if chain.family == "netdev" and chain.hook in ("ingress" if direction == "ingress" else "egress",):
                raise Refused(chain.line, f"netdev chain {chain.where} sees the unit's packets on a device; "
                                          "device chains are not followed")
        chains = [c for c in self.ruleset.chains.values() if c.hook in hooks and c.family in FAMILY_GUARD]
        return sorted(chains, key=lambda c: (hooks.index(c.hook), c.priority))

    def direction(self, direction: str) -> str:
        """The expression that holds exactly when nft lets the unit's packet through in `direction`."""
        self.going = direction
        expr = TRUE
        for chain in self.bases(direction):
            try:
                expr = ite(expr, text(self.base(chain)), FALSE)
            except TooLarge:
                raise Refused(chain.line, f"the translation of {self.unit}'s packets through {chain.where} "
                                          f"is too large (over {MAX_EXPRESSION} characters or steps)") from None
        return expr

    def policy(self, chain: Chain) -> str:
        policy = self.policies.get((chain.family, chain.table, chain.name)) or chain.policy or "accept"
        if policy not in ("accept", "drop"):
            raise Refused(chain.line, f"policy {policy} of {chain.where}: accept or drop")
        return TRUE if policy == "accept" else FALSE

    def base(self, chain: Chain) -> str:
        if chain.type == "nat" and chain.rules:
            raise Refused(chain.rules[0].line, f"{chain.where} is a nat chain: it sees a connection's first "
                                               "packet only, which bpfwall cannot tell apart")
        self.hook = chain.hook
        expr = self.run(chain, self.policy(chain), ())
        guard = FAMILY_GUARD[chain.family]
        return branch(guard, expr, TRUE) if guard else expr

    def run(self, chain: Chain, on_return: str, callers: tuple) -> str:
        """What `chain` decides; `on_return` is what happens when it ends without a verdict."""
        if len(callers) >= MAX_DEPTH:
            raise Refused(chain.rules[0].line if chain.rules else chain.line,
                          f"jumps nested deeper than {MAX_DEPTH} chains (nft refuses to load them)")
        steps = []
        for rule in chain.rules:
            t = self.rule(rule, chain)
            if t is None or t.verdict in (None, "continue"):
                continue
            cond = t.condition(self.going)
            if cond == FALSE:
                continue  # e.g. oifname on a received packet: nft finds no such device
            for note in t.notes:
                lines = self.notes.setdefault(note, [])
                if rule.line not in lines:
                    lines.append(rule.line)
            steps.append((rule, cond, t))
            if cond == TRUE and t.verdict != "jump":
                break  # nothing after an unconditional verdict, return or goto runs
        expr = on_return
        for rule, cond, t in reversed(steps):
            if t.verdict in ("jump", "goto"):
                target = self.target(chain, t.target, rule, callers)
                then = self.run(target, expr if t.verdict == "jump" else on_return, callers + (chain.name,))
            else:
                then = {"accept": TRUE, "drop": FALSE, "return": on_return}[t.verdict]
            expr = branch(cond, then, expr)
        return expr

    def target(self, chain: Chain, name: str, rule: Rule, callers: tuple) -> Chain:
        target = self.ruleset.chain(chain.family, chain.table, name)
        if target is None:
            raise Refused(rule.line, f"jump to {name}: table {chain.family} {chain.table} has no such chain")
        if target.hook is not None:
            raise Refused(rule.line, f"jump to {target.where}, a base chain (nft refuses it)")
        if name in callers or name == chain.name:
            raise Refused(rule.line, f"jump to {target.where} loops (nft refuses it)")
        return target

    def rule(self, rule: Rule, chain: Chain) -> Translation | None:
        """The rule's translation for this unit's packets, or None when it never matches them."""
        found = cgroup_match(rule.words)
        if found is not None and self.hook not in SOCKET_HOOKS:
            raise Refused(rule.line, f"socket cgroupv2 on the {self.hook} hook: nft finds no socket there "
                                     "(it refuses the rule)")
        if rule.unit == self.unit:
            t = self.own.get(rule.line)
        else:
            if found is not None and not self.in_cgroup(found, rule):
                return None  # a rule for another cgroup: whatever else it says, not the unit's packets
            if rule.unit is not None:
                raise Refused(rule.line, f"this rule of {rule.unit} can match {self.unit}'s packets too, and "
                                         f"where it stands among {self.unit}'s rules depends on which unit "
                                         "scnpm started first")
            try:
                t = translate(rule.words, chain.family, self.ruleset.defines)
            except Untranslatable as e:
                raise Refused(rule.line, str(e)) from None
            if t.cgroup is not None and not self.in_cgroup(t.cgroup, rule):
                return None
        if t is None:
            return None
        if t.rejects and self.hook not in SOCKET_HOOKS:
            raise Refused(rule.line, f"reject on the {self.hook} hook (nft refuses the rule)")
        for name, (kind, nft_name) in t.sets.items():
            seen = self.sets.setdefault(name, (kind, nft_name, chain.family, chain.table))
            if seen != (kind, nft_name, chain.family, chain.table):
                raise Refused(rule.line, f"set @{nft_name} is used as two kinds of set, or two sets share "
                                         f"the name @{name}")
        return t

    def in_cgroup(self, match: tuple[int, str], rule: Rule) -> bool:
        level, path = match
        if self.cgroup is None:
            raise Refused(rule.line, f"socket cgroupv2 names a cgroup, and no rule of {self.unit} says where "
                                     f"{self.unit}'s cgroup is, so whether it matches is not known")
        parts = path.strip("/").split("/")
        return level == len(parts) and self.cgroup.split("/")[:level] == parts
