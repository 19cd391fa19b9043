"""Unit names ↔ pin directory keys: injective, reversible, no '.' or '/' (bpffs refuses dots)."""
import pytest
from hypothesis import given, strategies as st

from bpfwall import unitkey

UNIT_CHARS = "abcxyzABC019:-_.\\@"
unit_names = st.text(alphabet=UNIT_CHARS, min_size=1, max_size=40).filter(lambda s: not s.startswith("."))


@pytest.mark.parametrize("unit,key", [
    ("nginx.service", "nginx+service"),
    ("getty@tty1.service", "getty@tty1+service"),
    ("system-foo\\x2dbar.slice", "system-foo\\x2dbar+slice"),
    ("app-firefox-1234.scope", "app-firefox-1234+scope"),
    ("x", "x"),
])
def test_examples(unit, key):
    assert unitkey.encode(unit) == key
    assert unitkey.decode(key) == unit


@given(unit_names)
def test_round_trip_and_bpffs_safe(unit):
    key = unitkey.encode(unit)
    assert "." not in key and "/" not in key and "%" not in key
    assert unitkey.decode(key) == unit


@given(unit_names, unit_names)
def test_injective(a, b):
    if a != b:
        assert unitkey.encode(a) != unitkey.encode(b)


@pytest.mark.parametrize("bad,message", [
    ("", "empty"),
    ("a/b.service", "'/'"),
    ("a+b.service", "'+'"),
    ("a b", "' '"),
    ("ünï.service", "'ü'"),
    (".service", "must not start with '.'"),
    ("a" * 256, "at most 255"),
])
def test_invalid(bad, message):
    with pytest.raises(unitkey.UnitNameError, match=None) as e:
        unitkey.encode(bad)
    assert message in str(e.value)


@pytest.mark.parametrize("pattern,key", [
    ("app-firefox-*.scope", "app-firefox-*+scope"),
    ("getty@tty[12].service", "getty@tty[12]+service"),
    ("worker-?.service", "worker-?+service"),
])
def test_glob_patterns_share_the_encoding(pattern, key):
    assert unitkey.is_pattern(pattern)
    assert unitkey.encode(pattern) == key
    assert unitkey.decode(key) == pattern


def test_glob_refused_where_a_unit_name_is_needed():
    with pytest.raises(unitkey.UnitNameError, match="'\\*' cannot occur"):
        unitkey.validate("app-*.scope", allow_glob=False)
