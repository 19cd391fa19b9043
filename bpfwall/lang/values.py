"""Literal values: numbers and addresses as written in expressions, set elements and params.

The lexer and the command line share these parsers so that `10.0.0.1/8` is
refused with the same words wherever it is written.
"""
from __future__ import annotations

import ipaddress
import re

from .errors import LangError
from .fields import ADDRESS_NAMES

NUMBER_RE = re.compile(r"0[xX][0-9a-fA-F]+|[0-9]+")
NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

SET_NUMBER_MAX = 2**32 - 1  # number sets are hash maps keyed by u32
PARAM_MAX = 2**64 - 1


def parse_number(text: str) -> int:
    """Decimal or 0x hex, any length; ValueError otherwise."""
    if not NUMBER_RE.fullmatch(text):
        raise ValueError(f"'{text}' is not a number")
    if text[:2].lower() == "0x":
        return int(text, 16)
    # Python refuses to convert more than 4300 decimal digits at once.
    value = 0
    for k in range(0, len(text), 4000):
        chunk = text[k:k + 4000]
        value = value * 10 ** len(chunk) + int(chunk)
    return value


def read_number(text: str) -> int:
    """A number as the language writes it: parse_number, but a decimal with a leading zero is
    refused, since C (and `make FILTER=`) reads `053` as octal 43 and bpfwall would read 53."""
    if len(text) > 1 and text[0] == "0" and text.isdigit():
        raise ValueError(leading_zero(text))
    return parse_number(text)


def leading_zero(text: str) -> str:
    """Why `text` (digits with a leading zero) is refused: both readings, and what to write."""
    decimal = str(parse_number(text.lstrip("0") or "0"))
    if len(text) > 40:
        return f"{text[:12]}… has a leading zero: write it without, or in 0x hex"
    if set(text) <= set("01234567"):
        octal = int(text, 8)
        if str(octal) == decimal:
            return f"{text} has a leading zero; write {decimal}"
        return (f"{text} has a leading zero: decimal {decimal}, or {octal} as C reads it (octal); "
                f"write {decimal}, or {hex(octal)} for the octal value")
    return f"{text} has a leading zero: decimal {decimal} (not a valid C octal number); write {decimal}"


IFNAME_MAX = 15  # IFNAMSIZ - 1
# Linux refuses '/', ':' and white space in a device name (dev_valid_name); bpfwall also keeps
# '"', '\\' and '*' out, so a name prints back as written and a '*' can only be the wildcard.
_IFNAME_CHARS = re.compile(r'[!#-)+-.0-9;-\[\]-~]+')


def interface_pattern(text: str) -> str:
    """`text` as an interface name or pattern (a name's beginning and `*`); ValueError saying why not."""
    name = text[:-1] if text.endswith("*") else text
    if not name and text:
        return text  # "*": every interface
    if not name:
        raise ValueError("an empty interface name")
    bad = _IFNAME_CHARS.sub("", name)
    if bad:
        what = "'*' only at the end" if bad[0] == "*" else f"no {bad[0]!r}"
        raise ValueError(f'"{text}" is not an interface name ({what}: letters, digits and . - _ @ …)')
    if len(name) > IFNAME_MAX:
        raise ValueError(f'"{text}" is too long for an interface name (at most {IFNAME_MAX} characters)')
    return text


def interface_matches(pattern: str, name: str | None) -> bool:
    """Whether interface `name` (None: none known) matches a name or a `prefix*` pattern — as nft's
    iifname/oifname match it."""
    if name is None:
        return False
    return name.startswith(pattern[:-1]) if pattern.endswith("*") else name == pattern


def show_number(value: int) -> str:
    """A number for a message; huge literals (always out of range) by their size."""
    return str(value) if value < 10**40 else f"a {value.bit_length()}-bit number"


def parse_network(text: str):
    """`addr` or `addr/prefix` (strict) → (network, has_prefix); ValueError with a readable message."""
    addr_text, slash, prefix_text = text.partition("/")
    family = "IPv6" if ":" in addr_text else "IPv4"
    try:
        if "%" in addr_text:  # ipaddress accepts IPv6 zone ids; a filter cannot match them
            raise ValueError
        addr = ipaddress.ip_address(addr_text)
    except ValueError:
        raise ValueError(f"'{addr_text}' is not a valid {family} address") from None
    if not slash:
        return ipaddress.ip_network(addr), False
    if not prefix_text.isdigit() or not prefix_text.isascii():
        raise ValueError(f"expected a prefix length after '{addr_text}/'")
    prefix, bits = int(prefix_text), addr.max_prefixlen
    if prefix > bits:
        raise ValueError(f"prefix /{prefix} is too long for an {family} address (at most /{bits})")
    try:
        return ipaddress.ip_network(f"{addr}/{prefix}"), True
    except ValueError:
        net = ipaddress.ip_network(f"{addr}/{prefix}", strict=False)
        raise ValueError(f"{addr}/{prefix} has host bits set; did you mean {net}?") from None


def parse_set_elements(name: str, kind: str, text: str) -> list:
    """Elements of @name: ints and (lo, hi) tuples for "number", networks for "address"."""
    if kind not in ("number", "address"):
        raise ValueError(f"set kind must be 'number' or 'address', not {kind!r}")
    if not text.strip():
        return []
    out = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            raise LangError(f"set @{name}: empty element (a stray ',' in {text.strip()!r})")
        if kind == "address" and item in ADDRESS_NAMES:  # systemd's names: a network of each family
            out.extend(ADDRESS_NAMES[item])
            continue
        try:
            out.append(_number_element(item) if kind == "number" else parse_network(item)[0])
        except ValueError as e:
            raise LangError(f"set @{name}: {e}") from None
    return out


def _number_element(item: str):
    lo_text, dots, hi_text = item.partition("..")
    lo = _set_number(lo_text.strip())
    if not dots:
        return lo
    hi = _set_number(hi_text.strip())
    if lo > hi:
        raise ValueError(f"empty range {item}")
    return (lo, hi)


def _set_number(text: str) -> int:
    value = read_number(text)
    if value > SET_NUMBER_MAX:
        raise ValueError(f"{text} is out of range for a number set (0..{SET_NUMBER_MAX})")
    return value


def _split_assignment(text: str, sigil: str, what: str) -> tuple[str, str]:
    name, eq, value = text.partition("=")
    name = name.strip()
    if name.startswith(sigil):
        name = name[1:]
    if not eq or not NAME_RE.fullmatch(name):
        raise LangError(f"expected {what}, got {text!r}")
    return name, value.strip()


def parse_param_assignment(text: str) -> tuple[str, int]:
    """`name=value` (a leading '$' is allowed) → (name, value in 0..2**64-1)."""
    name, value = _split_assignment(text, "$", "NAME=VALUE for a parameter")
    try:
        number = read_number(value)
    except ValueError as e:
        raise LangError(f"param ${name}: {e}") from None
    if number > PARAM_MAX:
        raise LangError(f"param ${name}: {value} is out of range (0..{PARAM_MAX})")
    return name, number


def parse_set_assignment(text: str) -> tuple[str, str]:
    """`name=e1,e2` (a leading '@' is allowed) → (name, raw elements for parse_set_elements)."""
    return _split_assignment(text, "@", "NAME=ELEMENTS for a set")
