"""Type checking: every way an expression can be wrong becomes one LangError with a column.

What passes here is safe to lower to C: booleans are conditions, numbers and
addresses are only compared with their own kind, literals fit the field they
meet, and every @set has one kind.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import ast
from .errors import LangError
from .fields import ADDR, BOOL, IFACE, NUMBER, field_type
from .names import unknown_name
from .parser import parse
from .printer import unparse
from .values import PARAM_MAX, show_number

# Examples for "X is a number; compare it, e.g. …".
_EXAMPLE = {"len": "len <= 1500", "icmp_type": "icmp_type == 8", "icmp_code": "icmp_code == 0"}


@dataclass(frozen=True)
class Checked:
    expr: ast.Expr
    text: str                 # normalized: unparse(expr)
    params: tuple[str, ...]   # in order of first appearance
    sets: dict[str, str]      # name -> "number" | "address"
    interfaces: tuple[str, ...] = ()  # interface names and patterns, in order of first appearance


# A unit's interface names are bits of one u64 in the kernel (lower/c.py).
MAX_INTERFACES = 64


def check(expr, text: str) -> Checked:
    """Check a parsed expression; `text` is its source, for error carets."""
    return _run(expr, text)[0]


def _run(expr, text: str):
    checker = _Checker(text)
    checker.condition(expr)
    interfaces = tuple(checker.interfaces)
    if len(interfaces) > MAX_INTERFACES:
        raise LangError(f"{len(interfaces)} different interface names; a unit can have at most {MAX_INTERFACES}")
    return Checked(expr, unparse(expr), tuple(checker.params), dict(checker.sets), interfaces), checker


def analyze(text: str) -> Checked:
    return check(parse(text), text)


def analyze_pair(ingress: str | None, egress: str | None) -> tuple[Checked | None, Checked | None]:
    """Both directions of a unit: they share params and sets, so a set must have one kind in both."""
    done = {}
    for direction, text in (("ingress", ingress), ("egress", egress)):
        if text is not None:
            try:
                done[direction] = _run(parse(text), text)
            except LangError as e:
                e.direction = direction
                raise
    if len(done) == 2:
        (first, _), (second, checker) = done["ingress"], done["egress"]
        for name, kind in second.sets.items():
            other = first.sets.get(name)
            if other is not None and other != kind:
                raise LangError(f"set @{name} is {_a(other)} set on ingress but {_a(kind)} set on egress; "
                                "one set cannot be both", checker.set_cols[name], egress)
        both = dict.fromkeys(first.interfaces + second.interfaces)
        if len(both) > MAX_INTERFACES:
            raise LangError(f"{len(both)} different interface names in ingress and egress; a unit can "
                            f"have at most {MAX_INTERFACES}")
    return tuple(done[d][0] if d in done else None for d in ("ingress", "egress"))


def _a(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def _empty(rng: ast.Range) -> bool:
    lo, hi = rng.lo, rng.hi
    return isinstance(lo, ast.NumLit) and isinstance(hi, ast.NumLit) and lo.value > hi.value


def _show(node) -> str:
    return show_number(node.value) if isinstance(node, ast.NumLit) else unparse(node)


class _Checker:
    def __init__(self, text: str):
        self.text = text
        self.params: dict[str, None] = {}  # an ordered set
        self.sets: dict[str, str] = {}
        self.set_cols: dict[str, int] = {}
        self.interfaces: dict[str, None] = {}  # an ordered set

    def error(self, message: str, node) -> LangError:
        return LangError(message, node.col, self.text)

    # -- conditions ------------------------------------------------------
    def condition(self, node) -> None:
        if isinstance(node, (ast.And, ast.Or)):
            for operand in node.operands:
                self.condition(operand)
        elif isinstance(node, ast.Not):
            self.condition(node.operand)
        elif isinstance(node, ast.Compare):
            self.compare(node)
        elif isinstance(node, ast.In):
            self.member(node)
        elif not isinstance(node, ast.BoolConst) and self.kind(node) != BOOL:
            raise self.error(self.not_a_condition(node), node)

    def not_a_condition(self, node) -> str:
        text = _show(node)
        if isinstance(node, ast.Field):
            if field_type(node.name)[0] == NUMBER:
                return f"{text} is a number; compare it, e.g. {_EXAMPLE.get(node.name, text + ' == 53')}"
            if field_type(node.name)[0] == IFACE:
                return f'{text} is an interface name; compare it, e.g. {text} == "wg0"'
            return f"{text} is an address; compare it, e.g. {text} == 10.0.0.1 or {text} in 10.0.0.0/8"
        if isinstance(node, ast.StrLit):
            return f"{text} is an interface name; compare it, e.g. ifname == {text}"
        if isinstance(node, ast.NumLit) and node.value in (0, 1):
            # `FILTER=1` passes everything in C filters; here a condition is a boolean.
            word = "true" if node.value else "false"
            return f"{text} is a number, not a condition; write {word} (1 → true, 0 → false)"
        if isinstance(node, (ast.Param, ast.NumLit)):
            return f"{text} is a number; compare it, e.g. dst_port == {text}"
        if isinstance(node, ast.AddrName):
            return f"{text} is a name for networks, not a condition; e.g. remote_addr in {text}"
        how = "saddr ==" if isinstance(node, ast.AddrLit) and not node.cidr else "saddr in"
        return f"{text} is an address; compare it, e.g. {how} {text}"

    # -- values ----------------------------------------------------------
    def kind(self, node) -> str:
        """BOOL for boolean fields; NUMBER or ADDR for values; an error for anything else."""
        if isinstance(node, ast.Field):
            try:
                return field_type(node.name)[0]
            except KeyError:
                raise self.error(unknown_name(node.name), node) from None
        if isinstance(node, ast.Param):
            self.params.setdefault(node.name)
            return NUMBER
        if isinstance(node, ast.NumLit):
            return NUMBER
        if isinstance(node, (ast.AddrLit, ast.AddrName)):
            return ADDR
        if isinstance(node, ast.StrLit):
            self.interfaces.setdefault(node.value)
            return IFACE
        raise self.error(f"({unparse(node)}) is a condition, not a value; use it without comparing it", node)

    def value(self, node) -> str:
        """The kind of a value; booleans are refused."""
        kind = BOOL if isinstance(node, ast.BoolConst) else self.kind(node)
        if kind == BOOL:
            text = unparse(node)
            raise self.error(f"{text} is a boolean; use it directly ({text}, !{text})", node)
        return kind

    def describe(self, node, kind: str) -> str:
        return f"{_show(node)} ({_a(kind)})"

    def fits(self, node, subject) -> None:
        """A number literal must fit the field it meets (u64 when it meets no field)."""
        if not isinstance(node, ast.NumLit):
            return
        if isinstance(subject, ast.Field):
            top, what = 2 ** field_type(subject.name)[1] - 1, f" for {subject.name}"
        else:
            top, what = PARAM_MAX, ""
        if node.value > top:
            raise self.error(f"{_show(node)} is out of range{what} (0..{top})", node)

    # -- comparisons -----------------------------------------------------
    def compare(self, node: ast.Compare) -> None:
        left, right = node.left, node.right
        lk, rk = self.value(left), self.value(right)
        if lk != rk:
            raise self.error(f"cannot compare {self.describe(left, lk)} with {self.describe(right, rk)}", right)
        if lk == NUMBER:
            self.fits(left, right)
            self.fits(right, left)
            return
        if lk == IFACE:
            if node.op not in ("==", "!="):
                raise self.error("interface names have no order; use ==, != or in", node)
            if not isinstance(left, ast.Field) and not isinstance(right, ast.Field):
                raise self.error(f"compare ifname with a name, e.g. ifname == {unparse(left)}", node)
            return
        if node.op not in ("==", "!="):
            raise self.error("addresses have no order; use ==, != or in", node)
        for net, other in ((right, left), (left, right)):
            if isinstance(net, ast.AddrName) or isinstance(net, ast.AddrLit) and net.cidr:
                raise self.error(f"use 'in' to match a network: {_show(other)} in {unparse(net)}", net)

    def member(self, node: ast.In) -> None:
        subject, box = node.subject, node.container
        if isinstance(subject, ast.AddrName):
            raise self.error(f"{subject.name} is a name for networks; look an address up in it, "
                             f"e.g. remote_addr in {subject.name}", subject)
        kind = self.value(subject)
        if kind == IFACE:
            self.interface_member(subject, box)
            return
        if isinstance(box, ast.SetRef):
            self.set_ref(subject, kind, box)
            return
        if isinstance(box, ast.Range):
            items, what = (box,), "a range of numbers"
        elif isinstance(box, ast.SetLit):
            if not box.items:
                raise self.error("an empty set matches nothing; add elements, or write false", box)
            items, what = box.items, None
        elif isinstance(box, ast.AddrName) or isinstance(box, ast.AddrLit) and box.cidr:
            items, what = (box,), "a network"
        else:
            raise self.error(f"'in' needs a range, a set or a network, not {unparse(box)}", box)
        box_kind = None
        for item in items:
            item_kind = self.item_kind(item)
            box_kind = box_kind or item_kind
            if item_kind != box_kind:
                mixed = "numbers and addresses" if IFACE not in (item_kind, box_kind) else \
                    "interface names with numbers or addresses"
                raise self.error(f"a set cannot mix {mixed}", item)
        if kind != box_kind:
            what = what or {NUMBER: "a set of numbers", ADDR: "a set of addresses"}.get(
                box_kind, "a set of interface names")
            raise self.error(f"cannot match {self.describe(subject, kind)} against {what}", box)
        for item in items:
            for literal in (item.lo, item.hi) if isinstance(item, ast.Range) else (item,):
                self.fits(literal, subject)
            if isinstance(item, ast.Range) and _empty(item):
                raise self.error(f"empty range {unparse(item)}: the first bound must not exceed the second", item)

    def interface_member(self, subject, box) -> None:
        """`ifname in {"wg0", "wlan*"}`: names listed in the expression, never in @sets or ranges."""
        if not isinstance(subject, ast.Field):
            raise self.error(f"look ifname up in a set of names, e.g. ifname in {{{unparse(subject)}}}", subject)
        if isinstance(box, ast.SetRef):
            raise self.error('interface names are not kept in @sets; list them: ifname in {"wg0", "wlan*"}', box)
        if not isinstance(box, ast.SetLit):
            raise self.error(f'cannot match ifname (an interface) against {unparse(box)}; '
                             'list names: ifname in {"wg0", "wlan*"}', box)
        if not box.items:
            raise self.error("an empty set matches nothing; add elements, or write false", box)
        for item in box.items:
            if not isinstance(item, ast.StrLit):
                raise self.error(f"cannot match ifname (an interface) against {unparse(item)}; "
                                 "a set of interface names holds \"names\" only", item)
            self.kind(item)

    def item_kind(self, item) -> str:
        """The kind of a range, or of one element of a set literal."""
        if isinstance(item, ast.Range):
            for bound in (item.lo, item.hi):
                if not isinstance(bound, (ast.NumLit, ast.Param)):
                    raise self.error(f"a range bound must be a number or a $param, not {unparse(bound)}", bound)
                self.kind(bound)
            return NUMBER
        if not isinstance(item, (ast.NumLit, ast.Param, ast.AddrLit, ast.AddrName, ast.StrLit)):
            raise self.error(f"a set holds numbers, $params, ranges and addresses, not {unparse(item)}", item)
        return self.kind(item)

    def set_ref(self, subject, kind: str, box: ast.SetRef) -> None:
        if not isinstance(subject, ast.Field):
            raise self.error(f"only a packet field can be looked up in @{box.name} (e.g. dst_port in "
                             f"@{box.name}), not {_show(subject)}", subject)
        seen = self.sets.setdefault(box.name, kind)
        self.set_cols.setdefault(box.name, box.col)
        if seen != kind:
            raise self.error(f"@{box.name} is used as {_a(seen)} set and as {_a(kind)} set", box)
