"""globs_meet: whether one name matches several globs, against trying every short name."""
from __future__ import annotations

from fnmatch import fnmatchcase
from itertools import product

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpfwall.policy.globs import globs_meet


@pytest.mark.parametrize("glob, meets", [
    ("*", True), ("*.s*", True), ("*e", True), ("?*", True), ("*.service", False), ("app-*", True),
    ("app-*.scope", False), ("*[a-z]", True), ("*[!e]", False), ("[", False), ("*.slic[e]", True),
    ("*.slice", True), ("x.slice", True), ("foo.service", False), ("*.slice?", False),
])
def test_which_globs_can_name_a_slice(glob, meets):
    assert globs_meet(glob, "?*.slice") is meets


_SMALL = "ab."
_GLOB = st.text(alphabet="ab.*?[]!", max_size=5)


@settings(max_examples=500)
@given(_GLOB, _GLOB)
def test_agrees_with_trying_every_short_name(g1, g2):
    # over the names of up to 6 characters from a small alphabet: if one matches both, they meet;
    # and when the short names find none, the globs (at most 5 characters of pattern) meet on no
    # name at all unless a longer or other-character name does, which the automaton must prove
    found = any(fnmatchcase(n, g1) and fnmatchcase(n, g2)
                for k in range(1, 7) for n in map("".join, product(_SMALL, repeat=k)))
    if found:
        assert globs_meet(g1, g2)
    elif globs_meet(g1, g2):
        # a witness exists over the unit alphabet: find it among names of the full alphabet's
        # characters that the globs mention, or any one other character
        chars = sorted({c for c in g1 + g2 if c not in "*?[]!"} | {"z"})
        assert any(fnmatchcase(n, g1) and fnmatchcase(n, g2)
                   for k in range(1, 8) for n in map("".join, product(chars, repeat=k)))
