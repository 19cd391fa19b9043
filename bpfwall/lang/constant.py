"""What an expression is whatever the packet: true, false, or it depends (None).

Folds the boolean constants through `!`, `&&` and `||` only: `false`, `!true`,
`tcp && false` are false for every packet. It never claims more than it proves
(`tcp && udp` is never true either, but is left undecided), so a warning built on
it ("this default drops everything") is never wrong.
"""
from __future__ import annotations

from . import ast


def constant(expr) -> bool | None:
    if isinstance(expr, ast.BoolConst):
        return expr.value
    if isinstance(expr, ast.Not):
        inner = constant(expr.operand)
        return None if inner is None else not inner
    if isinstance(expr, (ast.And, ast.Or)):
        decisive = isinstance(expr, ast.Or)  # the value that decides: true for ||, false for &&
        values = [constant(o) for o in expr.operands]
        if decisive in values:
            return decisive
        return (not decisive) if all(v is not None for v in values) else None
    return None


def never_passes(expr) -> bool:
    return constant(expr) is False
