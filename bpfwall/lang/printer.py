"""AST → normalized text: `&&`, `||`, `!`, single spaces, parentheses only where needed."""
from __future__ import annotations

from . import ast

# Binding strength; an operand binding weaker than its parent needs parentheses.
_OR, _AND, _NOT, _CMP, _ATOM = range(5)
_DECIMAL_LIMIT = 10**4000


def _level(node) -> int:
    if isinstance(node, ast.Or):
        return _OR
    if isinstance(node, ast.And):
        return _AND
    if isinstance(node, ast.Not):
        return _NOT
    if isinstance(node, (ast.Compare, ast.In)):
        return _CMP
    return _ATOM


def _operand(node, parent: int) -> str:
    text = unparse(node)
    return f"({text})" if _level(node) < parent else text


def unparse(node) -> str:
    """The normalized text of any node; parsing it gives back the same tree (up to columns)."""
    if isinstance(node, ast.Or):
        # A nested Or needs no parentheses: parsing flattens it back into the same n-ary node.
        return " || ".join(_operand(o, _OR) for o in node.operands)
    if isinstance(node, ast.And):
        return " && ".join(_operand(o, _AND) for o in node.operands)
    if isinstance(node, ast.Not):
        return "!" + _operand(node.operand, _NOT)
    if isinstance(node, ast.Compare):
        return f"{_operand(node.left, _ATOM)} {node.op} {_operand(node.right, _ATOM)}"
    if isinstance(node, ast.In):
        return f"{_operand(node.subject, _ATOM)} in {unparse(node.container)}"
    if isinstance(node, ast.Range):
        return f"{unparse(node.lo)}..{unparse(node.hi)}"
    if isinstance(node, ast.SetLit):
        return "{" + ", ".join(unparse(i) for i in node.items) + "}"
    if isinstance(node, ast.SetRef):
        return "@" + node.name
    if isinstance(node, ast.Param):
        return "$" + node.name
    if isinstance(node, ast.NumLit):
        # Decimal output stops at 4300 digits; such literals are out of range anyway.
        return str(node.value) if node.value < _DECIMAL_LIMIT else hex(node.value)
    if isinstance(node, ast.AddrLit):
        return str(node.net) if node.cidr else str(node.net.network_address)
    if isinstance(node, ast.Field):
        return node.name
    if isinstance(node, ast.BoolConst):
        return "true" if node.value else "false"
    raise TypeError(f"not an AST node: {node!r}")
