"""The language reference `bpfwall help language` prints, made from the language's own
tables (fields.py) so that it cannot disagree with what the checker accepts; every
example in it is an expression the checker accepts (tests/unit/test_help.py)."""
from __future__ import annotations

import textwrap

from .fields import ADDRESS_NAMES, ALIASES, BOOL, FIELDS, IFACE, MEANINGS, NUMBER, field_type

# (syntax, meaning, example), loosest binding first.
OPERATORS = [
    ("a || b, a or b", "either", "udp || tcp"),
    ("a && b, a and b", "both", "tcp && dst_port == 22"),
    ("!a, not a", "not; looser than a comparison: !dst_port == 53 means !(dst_port == 53)",
     "!icmp"),
    ("== != < <= > >=", "compare a number with a number, an address with an address", "dst_port != 53"),
    ("x in lo..hi", "a range, both ends included", "dst_port in 8000..8100"),
    ("x in {a, b, lo..hi, $p}", "any of a list (numbers, ranges, params; or addresses and networks)",
     "dst_port in {80, 443, 8000..8100, $extra}"),
    ("addr in NET", "an address in a network (of the same family)", "saddr in 10.0.0.0/8"),
    ("( … )", "grouping", "(tcp || udp) && dst_port == 53"),
]

VALUES = [
    ("$name", "a param: a number (0..2^64-1) set with --param name=V at load and changed live with "
              "`bpfwall set UNIT name=V`; 0 until set", "dst_port == $port"),
    ("@name", "a set held in a map: numbers and ranges, or addresses and networks (v4 and v6 in one); "
              "filled with --set name=E1,E2 and changed live with `bpfwall set UNIT @name+E` / @name-E / "
              "@name=E", "dst_port in @ports"),
    ("numbers", "decimal or 0x hex (a leading zero is refused: C would read 053 as octal)",
     "dst_port == 0x35"),
    ("address names", "systemd's (IPAddressAllow=), a network of each family: "
     + "; ".join(f"{name} = {' and '.join(map(str, nets))}" for name, nets in ADDRESS_NAMES.items())
     + "; wherever a network goes, also in @sets", "remote_addr in {localhost, link-local}"),
    ("true, false", "constants (not 1 and 0)", "true"),
]


def _type(name: str) -> str:
    kind, bits = field_type(name)
    if kind == BOOL:
        return "boolean"
    if kind == NUMBER:
        return f"number 0..{2 ** bits - 1}"
    return "interface name" if kind == IFACE else "address"


def _table(rows: list[tuple[str, ...]], width: int = 100) -> list[str]:
    """Rows aligned in columns; the last column (free text) wrapped under itself, never inside an
    example (written with no-break spaces until here)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    out = []
    for *cells, text in rows:
        head = "  " + "".join(f"{c:<{w}}  " for c, w in zip(cells, widths, strict=False))
        out += textwrap.wrap(text, width, initial_indent=head, subsequent_indent=" " * len(head))
    return [line.replace(_NBSP, " ") for line in out]


_NBSP = "\xa0"


def _eg(meaning: str, example: str) -> str:
    return f"{meaning}; e.g. {example.replace(' ', _NBSP)}"


def fields() -> list[tuple[str, str, str, str]]:
    """(name, type, meaning, example) of every field and alias, in the tables' order."""
    return [(name, _type(name), *MEANINGS[name]) for name in [*FIELDS, *ALIASES]]


def reference() -> str:
    lines = ["An expression is a condition on one packet: true → the packet passes, false → it is",
             "dropped (in audit mode every packet passes and those it would drop are counted).",
             "", "Fields (a number the packet does not have reads as 0: ports of ICMP, icmp_type of TCP):"]
    lines += _table([(n, t, _eg(m, e)) for n, t, m, e in fields()])
    lines += ["", "Operators, loosest first:"]
    lines += _table([(s, _eg(m, e)) for s, m, e in OPERATORS])
    lines += ["", "Params, sets and literals:"]
    lines += _table([(s, _eg(m, e)) for s, m, e in VALUES])
    lines += [""] + textwrap.wrap(
        "Addresses: 10.0.0.1, 10.0.0.0/8, ::1, fd00::/8; an address of one family never equals one of the "
        "other. Both directions of a unit share its params and sets; local_*/remote_* let one expression "
        "serve both.", 100)
    return "\n".join(lines)


def examples() -> list[tuple[str, str]]:
    """(what it illustrates, example) of every example in the reference."""
    return [(n, e) for n, _, _, e in fields()] + [(s, e) for s, _, e in OPERATORS + VALUES]
