"""Text → tokens. Every token keeps its 1-based column for error carets."""
from __future__ import annotations

import re
from typing import NamedTuple

from .errors import LangError
from .fields import ADDRESS_NAMES
from .values import NAME_RE, interface_pattern, leading_zero, parse_network, parse_number

# Token kinds. Keywords become the operator they spell ("and" → "&&"), so the
# parser sees one vocabulary; `text` keeps the spelling for messages.
NAME, PARAM, SET, NUMBER, ADDRESS, ADDRESS_NAME, STRING, BOOL, OP, EOF = (
    "name", "param", "set", "number", "address", "address name", "string", "bool", "op", "eof")

KEYWORDS = {"and": (OP, "&&"), "or": (OP, "||"), "not": (OP, "!"), "in": (OP, "in"),
            "true": (BOOL, True), "false": (BOOL, False)}
_OPERATORS = ("&&", "||", "==", "!=", "<=", ">=", "..", "!", "<", ">", "(", ")", "{", "}", ",")
_MISTAKES = {"=": "'=' is not an operator; use '==' to compare",
             "&": "'&' is not an operator; use '&&'",
             "|": "'|' is not an operator; use '||'"}

_HEX_RUN = re.compile(r"[0-9A-Fa-f:.]+")  # an IPv6 address is a run of these holding a ':'
_PREFIX = re.compile(r"/[0-9]*")
_HEX = re.compile(r"0[xX][0-9a-fA-F]*")
_DOTTED = re.compile(r"[0-9]+(?:\.[0-9]+)*")  # stops before '..', so 1..5 is a range
_WORD_TAIL = re.compile(r"[A-Za-z0-9_]+")
_SPACE = re.compile(r"\s+")


class Token(NamedTuple):
    kind: str
    value: object
    col: int
    text: str


def tokenize(text: str) -> list[Token]:
    tokens, i, n = [], 0, len(text)
    while i < n:
        m = _SPACE.match(text, i)
        if m:
            i = m.end()
            continue
        c = text[i]
        end = _address_end(text, i)
        if end:
            tokens.append(_address(text, i, end))
        elif "0" <= c <= "9":
            tokens.append(_number(text, i))
        elif NAME_RE.match(c):
            word = _word(text, i)
            kind, value = KEYWORDS.get(word, (ADDRESS_NAME, word) if word in ADDRESS_NAMES else (NAME, word))
            tokens.append(Token(kind, value, i + 1, word))
        elif c == '"':
            tokens.append(_string(text, i))
        elif c in "$@":
            m = NAME_RE.match(text, i + 1)
            if not m:
                what = "parameter" if c == "$" else "set"
                raise LangError(f"expected a {what} name after '{c}'", i + 1, text)
            tokens.append(Token(PARAM if c == "$" else SET, m.group(), i + 1, c + m.group()))
        else:
            op = next((o for o in _OPERATORS if text.startswith(o, i)), None)
            if op is None:
                raise LangError(_MISTAKES.get(c, f"unexpected character {c!r}"), i + 1, text)
            tokens.append(Token(OP, op, i + 1, op))
        i = tokens[-1].col - 1 + len(tokens[-1].text)
    tokens.append(Token(EOF, None, n + 1, ""))
    return tokens


def _string(text: str, i: int) -> Token:
    """`"wg0"`: an interface name or pattern (the only strings the language has)."""
    end = text.find('"', i + 1)
    if end < 0:
        raise LangError("missing '\"' to close the interface name", i + 1, text)
    try:
        value = interface_pattern(text[i + 1:end])
    except ValueError as e:
        raise LangError(str(e), i + 1, text) from None
    return Token(STRING, value, i + 1, text[i:end + 1])


def _word(text: str, i: int) -> str:
    """The name at i; `link-local` (systemd's spelling) is one word, though '-' is no operator."""
    word = NAME_RE.match(text, i).group()
    tail = NAME_RE.match(text, i + len(word) + 1) if text.startswith("-", i + len(word)) else None
    if tail and f"{word}-{tail.group()}" in ADDRESS_NAMES:
        return f"{word}-{tail.group()}"
    return word


def _address_end(text: str, i: int) -> int:
    """End of an IPv6 address (with its /prefix) starting at i, or 0 when there is none."""
    m = _HEX_RUN.match(text, i)
    if not m:
        return 0
    run = m.group().split("..", 1)[0]
    if ":" not in run:
        return 0
    end = i + len(run)
    m = _PREFIX.match(text, end)
    return m.end() if m else end


def _address(text: str, i: int, end: int) -> Token:
    end = _check_tail(text, i, end, "address")
    try:
        net, cidr = parse_network(text[i:end])
    except ValueError as e:
        raise LangError(str(e), i + 1, text) from None
    return Token(ADDRESS, (net, cidr), i + 1, text[i:end])


def _number(text: str, i: int) -> Token:
    m = _HEX.match(text, i)
    if m:
        if len(m.group()) == 2:
            raise LangError("expected hex digits after '0x'", i + 1, text)
        end = _check_tail(text, i, m.end(), "number")
        return Token(NUMBER, parse_number(m.group()), i + 1, text[i:end])
    m = _DOTTED.match(text, i)
    if "." in m.group():  # an IPv4 address
        m2 = _PREFIX.match(text, m.end())
        return _address(text, i, m2.end() if m2 else m.end())
    end = _check_tail(text, i, m.end(), "number")
    digits = m.group()
    if len(digits) > 1 and digits[0] == "0":
        raise LangError(leading_zero(digits), i + 1, text)
    return Token(NUMBER, parse_number(digits), i + 1, text[i:end])


def _check_tail(text: str, i: int, end: int, what: str) -> int:
    """Refuse a literal glued to a word (`80abc`, `10.0.0.1x`): it is a typo, not two tokens."""
    m = _WORD_TAIL.match(text, end)
    if m:
        raise LangError(f"invalid {what} '{text[i:m.end()]}'", i + 1, text)
    return end
