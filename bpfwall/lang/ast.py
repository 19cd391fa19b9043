"""The AST of the filter language: the hub every other layer reads.

Every node carries `col`, the 1-based column in the source text where it
starts, so that errors found after parsing can still point at the text.
Nodes are frozen dataclasses: lowering and evaluation never mutate them.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Union

from .fields import ADDRESS_NAMES

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


@dataclass(frozen=True)
class BoolConst:
    value: bool
    col: int


@dataclass(frozen=True)
class Field:
    """A packet field as written (aliases such as local_port are kept; see fields.resolve)."""
    name: str
    col: int


@dataclass(frozen=True)
class Param:
    """`$name`: a live u64 parameter."""
    name: str
    col: int


@dataclass(frozen=True)
class NumLit:
    value: int
    col: int


@dataclass(frozen=True)
class AddrLit:
    """An IPv4/IPv6 address or network. `cidr` is True when written with a /prefix."""
    net: IPNetwork
    cidr: bool
    col: int

    @property
    def family(self) -> int:
        return self.net.version


@dataclass(frozen=True)
class StrLit:
    """`"wg0"`, `"wlan*"`: an interface name, or a pattern when it ends in `*` (values.py checks)."""
    value: str
    col: int


@dataclass(frozen=True)
class AddrName:
    """One of systemd's address names (`localhost`, …; fields.ADDRESS_NAMES): a network of each
    family, usable wherever a network is. Kept by name so that the normal form says what was written."""
    name: str
    col: int

    @property
    def nets(self) -> tuple:
        return ADDRESS_NAMES[self.name]


@dataclass(frozen=True)
class Range:
    """`lo..hi`, inclusive; bounds are numbers (NumLit or Param)."""
    lo: "NumExpr"
    hi: "NumExpr"
    col: int


@dataclass(frozen=True)
class SetLit:
    """`{a, b, lo..hi}`: items are NumLit, Param, Range, AddrLit or AddrName."""
    items: tuple
    col: int


@dataclass(frozen=True)
class SetRef:
    """`@name`: a named set kept in a map, editable live."""
    name: str
    col: int


@dataclass(frozen=True)
class Not:
    operand: "Expr"
    col: int


@dataclass(frozen=True)
class And:
    """n-ary (≥ 2 operands, flattened) so that long chains never make deep trees."""
    operands: tuple
    col: int


@dataclass(frozen=True)
class Or:
    """n-ary (≥ 2 operands, flattened), evaluated left to right."""
    operands: tuple
    col: int


@dataclass(frozen=True)
class Compare:
    """`left op right` with op one of == != < <= > >= (addresses: == and != only)."""
    op: str
    left: "Value"
    right: "Value"
    col: int


@dataclass(frozen=True)
class In:
    """`subject in container`; container is Range, SetLit, SetRef, a cidr AddrLit or an AddrName."""
    subject: "Value"
    container: Union[Range, SetLit, SetRef, AddrLit, AddrName]
    col: int


NumExpr = Union[NumLit, Param, Field]
Value = Union[Field, Param, NumLit, AddrLit, AddrName, StrLit]


def networks(node) -> tuple:
    """The networks an address literal or name stands for."""
    return node.nets if isinstance(node, AddrName) else (node.net,)
Expr = Union[BoolConst, Field, Not, And, Or, Compare, In]
