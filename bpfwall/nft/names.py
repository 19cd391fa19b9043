"""Names of the nft objects bpfwall owns: table, per-unit chains, sets and counters.

A unit name (or glob) becomes a key that keeps letters, digits and `_ . -`
and writes every other character as `/` + two hex digits (`getty@tty1.service`
→ `getty/40tty1.service`, `app-*.scope` → `app-/2a.scope`). `/` never occurs in
unit names, so the key is injective; every object of a unit is `<key>/<what>`,
where `<what>` starts with a letter that is not a hex digit, so no two units'
objects can share a name, and nothing of a unit can be named like the table's
own objects (`input`, `output`, `ingress_level_N`), which contain no `/`.

nft (the kernel) allows 255 bytes per name; a longer name keeps a readable
head and replaces the rest by a SHA-256 digest of the whole name.
"""
from __future__ import annotations

import hashlib
import re

from .. import unitkey
from .errors import NftError

NAME_MAX = 255
PREFIX_MAX = 127  # a `log prefix` (the kernel's NF_LOG_PREFIXLEN, less its NUL)
_KEEP = re.compile(r"[A-Za-z0-9_.-]")
TABLE_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
DIRECTION_TAG = {"ingress": "in", "egress": "out"}
BASE_CHAINS = {"ingress": "input", "egress": "output"}
HOOKS = {"ingress": "input", "egress": "output"}


def check_table(name: str) -> str:
    if not isinstance(name, str) or not TABLE_RE.fullmatch(name):
        raise NftError(f"invalid nft table name {name!r}: use a letter, then letters, digits, '_' or '-' "
                       "(at most 64 characters)")
    return name


def unit_key(unit: str) -> str:
    try:
        unitkey.validate(unit)
    except unitkey.UnitNameError as e:
        raise NftError(str(e)) from None
    return "".join(c if _KEEP.fullmatch(c) else f"/{ord(c):02x}" for c in unit)


def _bounded(name: str, limit: int = NAME_MAX, head: int = 120, tail: int = 80) -> str:
    if len(name.encode()) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:32]
    return f"{name[:head]}/h{digest}{name[-tail:]}"


def level_map(direction: str, level: int) -> str:
    return f"{direction}_level_{level}"


class UnitNames:
    """The nft names of one unit's objects."""

    def __init__(self, unit: str):
        self.unit = unit
        self.key = unit_key(unit)

    def chain(self, direction: str, index: int = 0) -> str:
        tag = DIRECTION_TAG[direction]
        return _bounded(f"{self.key}/{tag}" if index == 0 else f"{self.key}/{tag}.{index}")

    def counter(self, direction: str, verdict: str) -> str:
        return _bounded(f"{self.key}/{DIRECTION_TAG[direction]}.{verdict}")

    def log_prefix(self, direction: str, verdict: str) -> str:
        """The `log prefix` of the unit's drop events (verdict "drop" | "audit"): read back
        to (unit, direction, verdict) by nft/events.py through the table's state."""
        return _bounded(f"{self.key}/{DIRECTION_TAG[direction]} {verdict}", PREFIX_MAX, 60, 30)

    def set(self, name: str, key_type: str) -> str:
        return _bounded(f"{self.key}/s.{name}.{key_type}")

    # A strict slice default's hold (see layout.held_text): named in the table's own namespace,
    # without '/', since its rules are written in nft syntax; a digest of the unit name keeps
    # them apart (64 bits: a collision of two units' holds is not a practical concern).
    def _digest(self) -> str:
        return hashlib.sha256(self.unit.encode()).hexdigest()[:16]

    def held_chain(self, direction: str) -> str:
        return f"held_{DIRECTION_TAG[direction]}_{self._digest()}"

    def held_counter(self, direction: str) -> str:
        return f"held_{DIRECTION_TAG[direction]}_{self._digest()}"

    def known_set(self) -> str:
        return f"known_{self._digest()}"
