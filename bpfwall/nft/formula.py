"""Boolean formulas over nft atoms: what the lowering produces and the chain compiler consumes.

An Atom is a list of nft matches that all succeed on a packet (none meeting a
missing header): the conjunction one nft rule can test. The constructors
simplify constants and flatten nested And/Or, so formulas stay small.
"""
from __future__ import annotations

from dataclasses import dataclass


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
