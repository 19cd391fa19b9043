"""Unit names ↔ pin directory names.

bpffs refuses every name that contains a dot (kernel/bpf/inode.c reserves
them), and nearly every unit name has one. The key replaces '.' with '+'.
systemd unit names consist of ASCII letters, digits and ":-_.\\@" only, so '+'
never occurs in one and the encoding is injective and reversible:

    nginx.service            → nginx+service
    getty@tty1.service       → getty@tty1+service
    system-foo\\x2dbar.slice  → system-foo\\x2dbar+slice

'%' (a unit file specifier) is avoided on purpose, so the key can be written
into a unit file as it is.

A policy entry may name units by glob (`app-firefox-*.scope`); its program is
pinned once under the pattern itself. The glob characters `*?[]!` never occur
in unit names and bpffs accepts them, so patterns share the same encoding.
"""
from __future__ import annotations

import re

from .errors import Error

_UNIT_CHARS = re.compile(r"[A-Za-z0-9:_.\\@-]+")
_PATTERN_CHARS = re.compile(r"[A-Za-z0-9:_.\\@*?\[\]!-]+")
GLOB_CHARS = "*?["
UNIT_NAME_MAX = 255


class UnitNameError(Error, ValueError):
    """A name that cannot be a unit name; the message says which character."""


def is_pattern(name: str) -> bool:
    return any(ch in name for ch in GLOB_CHARS)


def validate(unit: str, allow_glob: bool = True) -> str:
    """`unit` if it is a unit name (or, with allow_glob, a glob of unit names)."""
    if not unit:
        raise UnitNameError("the unit name is empty")
    if len(unit) > UNIT_NAME_MAX:
        raise UnitNameError(f"unit name is {len(unit)} characters long; systemd allows at most {UNIT_NAME_MAX}")
    chars = _PATTERN_CHARS if allow_glob and is_pattern(unit) else _UNIT_CHARS
    if not chars.fullmatch(unit):
        bad = next(ch for ch in unit if not chars.fullmatch(ch))
        raise UnitNameError(
            f"invalid unit name {unit!r}: character {bad!r} cannot occur in a systemd unit name "
            "(allowed: letters, digits and : - _ . \\ @)")
    if unit.startswith("."):
        raise UnitNameError(f"invalid unit name {unit!r}: it must not start with '.'")
    return unit


def encode(unit: str) -> str:
    """The pin directory name of `unit`."""
    return validate(unit).replace(".", "+")


def decode(key: str) -> str:
    return key.replace("+", ".")
