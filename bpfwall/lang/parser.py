"""Tokens → AST by recursive descent.

Chains of `&&`/`||` are parsed in one loop into flat n-ary nodes, so only
nesting ('(' and '!') costs stack: a few frames per level, bounded by MAX_DEPTH.
"""
from __future__ import annotations

import ipaddress

from . import ast
from .errors import LangError
from .fields import known_names
from .lexer import ADDRESS, ADDRESS_NAME, BOOL, STRING, EOF, NAME, NUMBER, OP, PARAM, SET, Token, tokenize
from .names import did_you_mean, suggestions, unknown_name
from .printer import unparse

MAX_TEXT = 65536
MAX_NODES = 20000
MAX_DEPTH = 200

COMPARE_OPS = ("==", "!=", "<", "<=", ">", ">=")
_LITERALS = (PARAM, NUMBER, ADDRESS, ADDRESS_NAME, STRING)
_KNOWN = frozenset(known_names())


def parse(text: str, *, max_text: int | None = MAX_TEXT, max_nodes: int | None = MAX_NODES) -> ast.Expr:
    """Parse `text`; the size limits can be lifted (None) by callers that trust their input."""
    if max_text is not None and len(text) > max_text:
        raise LangError(f"expression is too long ({len(text)} characters; at most {max_text})")
    return _Parser(text, max_nodes).parse()


class _Parser:
    def __init__(self, text: str, max_nodes: int | None):
        self.text = text
        self.tokens = tokenize(text)
        self.pos = 0
        self.depth = 0
        self.nodes = 0
        self.max_nodes = max_nodes

    # -- plumbing --------------------------------------------------------
    def peek(self) -> Token:
        return self.tokens[self.pos]

    def take(self) -> Token:
        tok = self.tokens[self.pos]
        self.pos += 1
        return tok

    def at(self, *ops: str) -> bool:
        tok = self.tokens[self.pos]
        return tok.kind == OP and tok.value in ops

    def error(self, message: str, col: int) -> LangError:
        return LangError(message, col, self.text)

    def make(self, cls, *args):
        self.nodes += 1
        if self.max_nodes is not None and self.nodes > self.max_nodes:
            raise self.error(f"expression is too large (more than {self.max_nodes} nodes)", args[-1])
        return cls(*args)

    def enter(self, col: int) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(f"expression nests too deeply (more than {MAX_DEPTH} levels of '(' and '!')", col)

    def unexpected(self, tok: Token, expected: str) -> LangError:
        if tok.kind == EOF:
            return self.error(f"unexpected end of expression; expected {expected}", tok.col)
        hint = did_you_mean(suggestions(tok.text.lower(), ["and", "or", "in"])) if tok.kind == NAME else ""
        return self.error(f"unexpected '{tok.text}'; expected {expected}{hint}", tok.col)

    # -- conditions ------------------------------------------------------
    def parse(self) -> ast.Expr:
        if self.peek().kind == EOF:
            raise self.error("empty expression", 1)
        expr = self.boolean()
        tok = self.peek()
        if tok.kind != EOF:
            if tok.kind == OP and tok.value == ")":
                raise self.error("unmatched ')'", tok.col)
            raise self.unexpected(tok, "'&&', '||' or the end of the expression")
        return expr

    def boolean(self) -> ast.Expr:
        """`a && b || c && d`: one loop; && binds tighter than ||."""
        terms, factors = [], [self.operand()]
        while True:
            if self.at("&&"):
                self.take()
                factors.append(self.operand())
            elif self.at("||"):
                self.take()
                terms.append(self.join(ast.And, factors))
                factors = [self.operand()]
            else:
                terms.append(self.join(ast.And, factors))
                return self.join(ast.Or, terms)

    def join(self, cls, items: list):
        """One n-ary node; operands of the same kind (from parentheses) are flattened into it."""
        if len(items) == 1:
            return items[0]
        flat = []
        for item in items:
            if isinstance(item, cls):
                flat.extend(item.operands)
                self.nodes -= 1
            else:
                flat.append(item)
        return self.make(cls, tuple(flat), flat[0].col)

    def operand(self) -> ast.Expr:
        """`!`* then a value, compared or not. `!` binds looser than comparisons:
        `!dst_port == 53` is `!(dst_port == 53)`. (One method, not two: fewer frames per nesting level.)"""
        nots = []
        while self.at("!"):
            nots.append(self.take().col)
            self.enter(nots[-1])
        node = self.value()
        tok = self.peek()
        if self.at(*COMPARE_OPS):
            self.take()
            node = self.make(ast.Compare, tok.value, node, self.value(), node.col)
        elif self.at("in"):
            self.take()
            node = self.make(ast.In, node, self.container(node), node.col)
        if tok is not self.peek() and self.at(*COMPARE_OPS, "in"):
            raise self.error("comparisons cannot be chained; join them with '&&' (a < b && b < c)",
                             self.peek().col)
        for col in reversed(nots):
            node = self.make(ast.Not, node, col)
        self.depth -= len(nots)
        return node

    # -- values ----------------------------------------------------------
    def value(self):
        """A primary: `( condition )`, true/false, a field, $param, number or address."""
        tok = self.peek()
        if self.at("("):
            self.take()
            self.enter(tok.col)
            node = self.boolean()
            if not self.at(")"):
                close = self.peek()
                if close.kind == EOF:
                    raise self.error(f"missing ')' to close the '(' at column {tok.col}", close.col)
                raise self.unexpected(close, "'&&', '||' or ')'")
            self.take()
            self.depth -= 1
            return node
        if tok.kind == BOOL:
            self.take()
            return self.make(ast.BoolConst, tok.value, tok.col)
        if tok.kind == NAME:
            if tok.value not in _KNOWN:
                raise self.error(unknown_name(tok.value), tok.col)
            self.take()
            return self.make(ast.Field, tok.value, tok.col)
        if tok.kind in _LITERALS:
            return self.literal()
        if tok.kind == SET or self.at("{"):
            example = tok.text if tok.kind == SET else "{80, 443}"
            raise self.error(f"a set can only follow 'in', e.g. dst_port in {example}", tok.col)
        raise self.unexpected(tok, "a condition or a value")

    def literal(self):
        tok = self.take()
        if tok.kind == PARAM:
            return self.make(ast.Param, tok.value, tok.col)
        if tok.kind == NUMBER:
            return self.make(ast.NumLit, tok.value, tok.col)
        if tok.kind == ADDRESS_NAME:
            return self.make(ast.AddrName, tok.value, tok.col)
        if tok.kind == STRING:
            return self.make(ast.StrLit, tok.value, tok.col)
        return self.make(ast.AddrLit, tok.value[0], tok.value[1], tok.col)

    def container(self, subject):
        """After `in`: {…}, @set, a network, or lo..hi."""
        tok = self.peek()
        if self.at("{"):
            return self.set_literal()
        if tok.kind == SET:
            self.take()
            return self.make(ast.SetRef, tok.value, tok.col)
        if tok.kind not in _LITERALS:
            raise self.unexpected(tok, "a range (1..5), a set ({…} or @name) or a network after 'in'")
        item = self.literal()
        if self.at(".."):
            return self.range_rest(item)
        if isinstance(item, ast.AddrName) or isinstance(item, ast.AddrLit) and item.cidr:
            return item
        kind = {ast.AddrLit: "address", ast.StrLit: "interface"}.get(type(item), "number")
        raise self.error(f"'in' needs a range, a set or a network; to match one {kind} write "
                         f"{unparse(subject)} == {unparse(item)}", item.col)

    def range_rest(self, lo):
        """`lo .. hi` after lo; numbers and $params only."""
        self.take()  # ..
        tok = self.peek()
        if tok.kind not in _LITERALS:
            raise self.unexpected(tok, "a number or $param after '..'")
        hi = self.literal()
        if not isinstance(lo, (ast.NumLit, ast.Param)) or not isinstance(hi, (ast.NumLit, ast.Param)):
            raise self.error(_address_range_message(lo, hi), lo.col)
        return self.make(ast.Range, lo, hi, lo.col)

    def set_literal(self) -> ast.SetLit:
        brace = self.take()
        items = []
        if self.at("}"):
            raise self.error("an empty set matches nothing; add elements, or write false", brace.col)
        while True:
            tok = self.peek()
            if tok.kind not in _LITERALS:
                raise self.unexpected(tok, "a number, $param, range or address in the set")
            item = self.literal()
            items.append(self.range_rest(item) if self.at("..") else item)
            if self.at(","):
                self.take()
            elif self.at("}"):
                self.take()
                return self.make(ast.SetLit, tuple(items), brace.col)
            elif self.peek().kind == EOF:
                raise self.error(f"missing '}}' to close the '{{' at column {brace.col}", self.peek().col)
            else:
                raise self.unexpected(self.peek(), "',' or '}'")


def _address_range_message(lo, hi) -> str:
    """Address ranges are not in the language: say which networks cover the range."""
    base = "address ranges are not supported; use a network"
    if isinstance(lo, ast.StrLit) or isinstance(hi, ast.StrLit):
        return "interface names have no ranges; match a beginning with \"name*\""
    if isinstance(lo, ast.AddrName) or isinstance(hi, ast.AddrName):
        return f"{base} or an address name such as localhost"
    if not (isinstance(lo, ast.AddrLit) and isinstance(hi, ast.AddrLit)):
        return "a range cannot mix numbers and addresses"
    first, last = lo.net.network_address, hi.net.broadcast_address
    if first.version != last.version or first > last:
        return f"{base} such as 10.0.0.0/24"
    nets = list(ipaddress.summarize_address_range(first, last))
    if len(nets) == 1:
        return f"{base} instead: {nets[0]}"
    shown = ", ".join(str(n) for n in nets[:4]) + (", …" if len(nets) > 4 else "")
    return f"{base} instead: {{{shown}}}"
