"""Can one unit name match several fnmatch globs at once? (`*` and `*.slice` can: `a.slice`.)

`policy check` asks it to find the globs of units whose meaning changed when slices got
their own entries: a glob that could match a name ending in `.slice` used to sit on slices.
Each glob is read as a sequence of one-character patterns (a literal, `?`, a `[...]` class)
and `*`; the globs run side by side as automata over the characters unit names may hold,
and they meet when a state where every glob has ended is reachable. fnmatch's own
`fnmatchcase` decides whether a one-character pattern takes a character, so classes, `!`
and ranges mean exactly what they mean when matching.
"""
from __future__ import annotations

from fnmatch import fnmatchcase
import string

# The characters of unit names (unitkey.py); a glob meets another only over these.
ALPHABET = string.ascii_letters + string.digits + ":_.\\@-"


def _pieces(glob: str) -> list[str]:
    """`*` or a pattern of one character, in order; a `[` without its `]` is a literal, as in fnmatch."""
    out, i, n = [], 0, len(glob)
    while i < n:
        c = glob[i]
        if c == "[":
            j = i + 1
            if j < n and glob[j] == "!":
                j += 1
            if j < n and glob[j] == "]":
                j += 1
            j = glob.find("]", j)
            if j >= 0:
                out.append(glob[i:j + 1])
                i = j + 1
                continue
            out.append("[[]")
        elif c == "*":
            if not out or out[-1] != "*":
                out.append("*")
        else:
            out.append(c)
        i += 1
    return out


def _closure(pieces: list[str], states: frozenset[int]) -> frozenset[int]:
    out = set(states)
    for i in states:
        while i < len(pieces) and pieces[i] == "*":
            i += 1
            out.add(i)
    return frozenset(out)


def _step(pieces: list[str], states: frozenset[int], ch: str) -> frozenset[int]:
    after = set()
    for i in states:
        if i < len(pieces):
            if pieces[i] == "*":
                after.add(i)
            elif fnmatchcase(ch, pieces[i]):
                after.add(i + 1)
    return _closure(pieces, frozenset(after))


def globs_meet(*globs: str) -> bool:
    """Is there a name (over ALPHABET, at least one character) that every glob matches?"""
    machines = [_pieces(g) for g in globs]
    start = tuple(_closure(p, frozenset({0})) for p in machines)
    seen, frontier = {start}, [start]
    while frontier:
        following = []
        for states in frontier:
            for ch in ALPHABET:
                nxt = tuple(_step(p, s, ch) for p, s in zip(machines, states, strict=True))
                if not all(nxt):
                    continue
                if all(len(p) in s for p, s in zip(machines, nxt, strict=True)):
                    return True
                if nxt in seen:
                    continue
                seen.add(nxt)
                following.append(nxt)
        frontier = following
    return False
