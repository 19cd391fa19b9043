"""The reference semantics: a checked expression's verdict on one packet.

bpf/port_filter.c must decide exactly as `evaluate` does; the differential
test compares the two. Conventions the C shares: absent numbers read 0, unset
params read 0, unset sets are empty, and an address never equals (or lies in a
network of) the other family.
"""
from __future__ import annotations

import ipaddress
import operator

from . import ast
from .fields import DIRECTIONS, resolve
from .packet import PacketFields
from .values import interface_matches


def evaluate(expr, fields: PacketFields, direction: str, params: dict[str, int] | None = None,
             sets: dict[str, list] | None = None) -> bool:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
    return _Evaluator(fields, direction, params or {}, sets or {}).cond(expr)


class _Evaluator:
    def __init__(self, fields: PacketFields, direction: str, params: dict, sets: dict):
        self.fields = fields
        self.direction = direction
        self.params = params
        self.sets = sets

    def cond(self, node) -> bool:
        # Loops, not any()/all() over generators: one frame per tree level.
        if isinstance(node, ast.Or):
            for operand in node.operands:
                if self.cond(operand):
                    return True
            return False
        if isinstance(node, ast.And):
            for operand in node.operands:
                if not self.cond(operand):
                    return False
            return True
        if isinstance(node, ast.Not):
            return not self.cond(node.operand)
        if isinstance(node, ast.Compare):
            return self.compare(node)
        if isinstance(node, ast.In):
            return self.member(node)
        if isinstance(node, ast.BoolConst):
            return node.value
        return self.field(node)  # a boolean field

    def value(self, node):
        """An int for numbers; an IPv4/IPv6 address or network for addresses."""
        if isinstance(node, ast.NumLit):
            return node.value
        if isinstance(node, ast.Param):
            return self.params.get(node.name, 0)
        if isinstance(node, ast.AddrLit):
            return node.net
        return self.field(node)

    def field(self, node: ast.Field):
        name = resolve(node.name, self.direction)
        return getattr(self.fields, _ATTRIBUTES.get(name, name))

    def compare(self, node: ast.Compare) -> bool:
        if isinstance(node.left, ast.StrLit) or isinstance(node.right, ast.StrLit):
            pattern, field = (node.left, node.right) if isinstance(node.left, ast.StrLit) else (node.right, node.left)
            hit = interface_matches(pattern.value, self.field(field))
            return hit if node.op == "==" else not hit
        left, right = self.value(node.left), self.value(node.right)
        if isinstance(left, str) or isinstance(right, str) or left is None:  # ifname == ifname
            return node.op == "=="
        if isinstance(left, int):
            return _NUMBER_OPS[node.op](left, right)
        equal = _host(left) == _host(right)  # different families never compare equal
        return equal if node.op == "==" else not equal

    def member(self, node: ast.In) -> bool:
        x, box = self.value(node.subject), node.container
        if isinstance(box, ast.SetLit) and isinstance(box.items[0], ast.StrLit):
            return any(interface_matches(item.value, x) for item in box.items)
        if isinstance(box, ast.Range):
            return self.value(box.lo) <= x <= self.value(box.hi)
        if isinstance(box, (ast.AddrLit, ast.AddrName)):
            return _in_any(x, ast.networks(box))
        if isinstance(box, ast.SetRef):
            items = self.sets.get(box.name, ())
            if isinstance(x, int):
                return any(x == i if isinstance(i, int) else i[0] <= x <= i[1] for i in items)
            return any(_in_network(x, net) for net in items)
        for item in box.items:
            if isinstance(item, ast.Range):
                hit = self.value(item.lo) <= x <= self.value(item.hi)
            elif isinstance(item, (ast.AddrLit, ast.AddrName)):
                hit = _in_any(x, ast.networks(item))
            else:
                hit = x == self.value(item)
            if hit:
                return True
        return False


# Language names that differ from PacketFields attribute names.
_ATTRIBUTES = {"len": "length"}

_NUMBER_OPS = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
               ">": operator.gt, ">=": operator.ge}


def _host(value):
    """A packet address or a host literal (a /32 or /128 network) as (family, address)."""
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        value = value.network_address
    return value.version, value


def _in_any(value, nets) -> bool:
    for net in nets:
        if _in_network(value, net):
            return True
    return False


def _in_network(value, net) -> bool:
    """`value` (a packet address, or a literal network) lies in `net` of its own family."""
    if value.version != net.version:
        return False
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return value.subnet_of(net)
    return value in net
