"""Values from the command line (params, sets) and the checks across a unit's two directions."""
import ipaddress

import pytest

from bpfwall.lang.checker import analyze, analyze_pair
from bpfwall.lang.errors import LangError
from bpfwall.lang.values import parse_param_assignment, parse_set_assignment, parse_set_elements

net = ipaddress.ip_network


def test_number_elements():
    assert parse_set_elements("web", "number", "80, 443,0x1F90, 8000..8100, 5..5") == [
        80, 443, 8080, (8000, 8100), (5, 5)]
    assert parse_set_elements("web", "number", "4294967295") == [2**32 - 1]
    assert parse_set_elements("web", "number", "") == [] == parse_set_elements("web", "number", "  ")


def test_address_elements():
    assert parse_set_elements("bad", "address", "10.0.0.1, 10.0.0.0/8,::1 , fe80::/10") == [
        net("10.0.0.1/32"), net("10.0.0.0/8"), net("::1/128"), net("fe80::/10")]


@pytest.mark.parametrize("kind,text,message", [
    ("number", "80,,443", "set @s: empty element (a stray ',' in '80,,443')"),
    ("number", "80,", "empty element"),
    ("number", "http", "set @s: 'http' is not a number"),
    ("number", "4294967296", "set @s: 4294967296 is out of range for a number set (0..4294967295)"),
    ("number", "1..4294967296", "out of range"),
    ("number", "9..1", "set @s: empty range 9..1"),
    ("number", "-1", "'-1' is not a number"),
    ("address", "10.0.0.1/8", "set @s: 10.0.0.1/8 has host bits set; did you mean 10.0.0.0/8?"),
    ("address", "fe80::1/10", "did you mean fe80::/10?"),
    ("address", "10.0.0.0/33", "prefix /33 is too long for an IPv4 address (at most /32)"),
    ("address", "300.0.0.1", "set @s: '300.0.0.1' is not a valid IPv4 address"),
    ("address", "fe80::1%eth0", "'fe80::1%eth0' is not a valid IPv6 address"),
    ("address", "10.0.0.0/x", "expected a prefix length after '10.0.0.0/'"),
    ("address", "80", "'80' is not a valid IPv4 address"),
    ("number", "80,053", "set @s: 053 has a leading zero: decimal 53, or 43 as C reads it (octal)"),
    ("number", "1..010", "010 has a leading zero: decimal 10, or 8 as C reads it"),
])
def test_bad_elements(kind, text, message):
    with pytest.raises(LangError) as info:
        parse_set_elements("s", kind, text)
    assert message in str(info.value) and info.value.col is None


def test_unknown_kind():
    with pytest.raises(ValueError):
        parse_set_elements("s", "string", "x")


def test_params():
    assert parse_param_assignment("max=1500") == ("max", 1500)
    assert parse_param_assignment("$max = 0x10") == ("max", 16)
    assert parse_param_assignment("p=18446744073709551615") == ("p", 2**64 - 1)


@pytest.mark.parametrize("text,message", [
    ("max", "expected NAME=VALUE for a parameter, got 'max'"),
    ("1x=5", "expected NAME=VALUE"),
    ("max=", "param $max: '' is not a number"),
    ("max=ten", "param $max: 'ten' is not a number"),
    ("max=0755", "param $max: 0755 has a leading zero: decimal 755, or 493 as C reads it (octal)"),
    ("max=18446744073709551616", "param $max: 18446744073709551616 is out of range (0..18446744073709551615)"),
])
def test_bad_params(text, message):
    with pytest.raises(LangError, match=message.replace("$", r"\$").replace("(", r"\(").replace(")", r"\)")):
        parse_param_assignment(text)


def test_set_assignment():
    assert parse_set_assignment("web=80,443") == ("web", "80,443")
    assert parse_set_assignment("@web=") == ("web", "")
    with pytest.raises(LangError, match="expected NAME=ELEMENTS for a set"):
        parse_set_assignment("web")


# -- what the checker reports about params and sets ----------------------------

def test_params_and_sets_in_order_of_appearance():
    c = analyze("len > $z && dst_port in {$y, $x..$z} && saddr in @b || local_port in @a")
    assert c.params == ("z", "y", "x")
    assert list(c.sets.items()) == [("b", "address"), ("a", "number")]


def test_pair():
    i, e = analyze_pair("dst_port in @s && len < $max", "remote_port in @s")
    assert i.sets == e.sets == {"s": "number"} and i.params == ("max",) and e.params == ()
    assert analyze_pair(None, "tcp")[0] is None and analyze_pair("tcp", None)[1] is None
    assert analyze_pair(None, None) == (None, None)


def test_pair_refuses_a_set_of_two_kinds():
    with pytest.raises(LangError) as info:
        analyze_pair("dst_port in @s", "tcp && saddr in @s")
    e = info.value
    assert e.message == ("set @s is a number set on ingress but an address set on egress; "
                         "one set cannot be both")
    assert e.col == 17 and e.text == "tcp && saddr in @s"


def test_pair_reports_errors_of_each_side():
    with pytest.raises(LangError, match="unknown name 'tpc'") as info:
        analyze_pair("tcp", "tpc")
    assert info.value.text == "tpc"
