"""AST → normalized text: `&&`, `||`, `!`, single spaces, parentheses only where needed
(and around a comparison under `!`, where precedence is not obvious to a reader).

One call per tree level (loops, not generators, over operands) keeps the
stack shallow at the parser's maximum nesting.
"""
from __future__ import annotations

from . import ast

# Binding strength; an operand binding weaker than its parent needs parentheses.
_OR, _AND, _NOT, _CMP, _ATOM = range(5)
_DECIMAL_LIMIT = 10**4000
_LEVELS = {ast.Or: _OR, ast.And: _AND, ast.Not: _NOT, ast.Compare: _CMP, ast.In: _CMP}


def unparse(node, parent: int = _OR) -> str:
    """The normalized text of any node; parsing it gives back the same tree (up to columns).

    `parent` is the binding strength of the context the text goes into.
    """
    if isinstance(node, (ast.Or, ast.And)):
        # A nested node of the same kind needs no parentheses: parsing flattens it back.
        level = _LEVELS[type(node)]
        parts = []
        for operand in node.operands:
            parts.append(unparse(operand, level))
        text = (" || " if level == _OR else " && ").join(parts)
    elif isinstance(node, ast.Not):
        # `!dst_port == 53` parses as !(dst_port == 53), but few readers know `!` binds looser
        # than a comparison: written with the parentheses that say so.
        operand = node.operand
        strength = _ATOM if isinstance(operand, (ast.Compare, ast.In)) else _NOT
        text = "!" + unparse(operand, strength)
    elif isinstance(node, ast.Compare):
        text = f"{unparse(node.left, _ATOM)} {node.op} {unparse(node.right, _ATOM)}"
    elif isinstance(node, ast.In):
        text = f"{unparse(node.subject, _ATOM)} in {unparse(node.container)}"
    elif isinstance(node, ast.Range):
        text = f"{unparse(node.lo)}..{unparse(node.hi)}"
    elif isinstance(node, ast.SetLit):
        text = "{" + ", ".join([unparse(i) for i in node.items]) + "}"
    elif isinstance(node, ast.SetRef):
        text = "@" + node.name
    elif isinstance(node, ast.Param):
        text = "$" + node.name
    elif isinstance(node, ast.NumLit):
        # Decimal output stops at 4300 digits; such literals are out of range anyway.
        text = str(node.value) if node.value < _DECIMAL_LIMIT else hex(node.value)
    elif isinstance(node, ast.AddrLit):
        text = str(node.net) if node.cidr else str(node.net.network_address)
    elif isinstance(node, ast.StrLit):
        text = f'"{node.value}"'  # interface patterns hold no '"' or '\\' (values.interface_pattern)
    elif isinstance(node, (ast.Field, ast.AddrName)):
        text = node.name
    elif isinstance(node, ast.BoolConst):
        text = "true" if node.value else "false"
    else:
        raise TypeError(f"not an AST node: {node!r}")
    return f"({text})" if _LEVELS.get(type(node), _ATOM) < parent else text
