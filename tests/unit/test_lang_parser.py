"""Lexer and parser: tokens, precedence, flattening, columns, aliases."""
import ipaddress

import pytest

from bpfwall.lang import ast
from bpfwall.lang.checker import analyze
from bpfwall.lang.lexer import ADDRESS, BOOL, EOF, NAME, NUMBER, OP, PARAM, SET, tokenize
from bpfwall.lang.parser import parse


def kinds(text):
    return [(t.kind, t.value) for t in tokenize(text)][:-1]


def test_tokens_and_columns():
    toks = tokenize("dst_port in {80,0x1bb} && $p>=1 || @s")
    assert [(t.kind, t.value, t.col) for t in toks] == [
        (NAME, "dst_port", 1), (OP, "in", 10), (OP, "{", 13), (NUMBER, 80, 14), (OP, ",", 16),
        (NUMBER, 443, 17), (OP, "}", 22), (OP, "&&", 24), (PARAM, "p", 27), (OP, ">=", 29),
        (NUMBER, 1, 31), (OP, "||", 33), (SET, "s", 36), (EOF, None, 38)]


def test_keywords_are_operators():
    assert kinds("not a and b or c in true false") == [
        (OP, "!"), (NAME, "a"), (OP, "&&"), (NAME, "b"), (OP, "||"), (NAME, "c"), (OP, "in"),
        (BOOL, True), (BOOL, False)]


def test_number_range_is_not_an_address():
    assert kinds("1..5") == [(NUMBER, 1), (OP, ".."), (NUMBER, 5)]
    assert kinds("0x10..0x20") == [(NUMBER, 16), (OP, ".."), (NUMBER, 32)]


@pytest.mark.parametrize("text,net,cidr", [
    ("10.0.0.1", "10.0.0.1/32", False), ("10.0.0.0/8", "10.0.0.0/8", True), ("::1", "::1/128", False),
    ("fe80::1", "fe80::1/128", False), ("2001:db8::/32", "2001:db8::/32", True), ("::", "::/128", False),
    ("::ffff:1.2.3.4", "::ffff:102:304/128", False), ("dead:beef::/32", "dead:beef::/32", True),
    ("1:2:3:4:5:6:7:8", "1:2:3:4:5:6:7:8/128", False), ("0.0.0.0/0", "0.0.0.0/0", True),
])
def test_addresses(text, net, cidr):
    assert kinds(text) == [(ADDRESS, (ipaddress.ip_network(net), cidr))]


def test_address_then_range_dots():
    assert [k for k, _ in kinds("10.0.0.1..10.0.0.9")] == [ADDRESS, OP, ADDRESS]
    assert [k for k, _ in kinds("::1..::9")] == [ADDRESS, OP, ADDRESS]


def test_whitespace_anywhere():
    assert analyze(" \t(tcp)\n&&\tdst_port\n==\n80 ").text == "tcp && dst_port == 80"
    assert analyze("tcp&&dst_port==80||udp").text == "tcp && dst_port == 80 || udp"


def test_huge_numbers_lex_exactly():
    assert kinds("1" * 5000)[0][1] == (10**5000 - 1) // 9  # past int()'s 4300-digit limit


def test_and_binds_tighter_than_or():
    e = parse("ip || tcp && udp")
    assert isinstance(e, ast.Or) and isinstance(e.operands[1], ast.And)
    e = parse("ip && tcp || udp")
    assert isinstance(e, ast.Or) and isinstance(e.operands[0], ast.And)


def test_not_binds_looser_than_comparison():
    e = parse("!dst_port == 53")
    assert isinstance(e, ast.Not) and isinstance(e.operand, ast.Compare)
    e = parse("not dst_port in 1..5 && tcp")
    assert isinstance(e, ast.And) and isinstance(e.operands[0], ast.Not)
    assert isinstance(e.operands[0].operand, ast.In)


def test_flattening():
    e = parse("ip && (tcp && (udp && icmp))")
    assert isinstance(e, ast.And) and [o.name for o in e.operands] == ["ip", "tcp", "udp", "icmp"]
    e = parse("(ip || tcp) || udp || (icmp || ipv6)")
    assert isinstance(e, ast.Or) and len(e.operands) == 5
    # Different kinds keep their structure.
    e = parse("ip && (tcp || udp)")
    assert isinstance(e, ast.And) and isinstance(e.operands[1], ast.Or)


def test_parenthesised_values():
    e = parse("(dst_port) == ((80))")
    assert e == ast.Compare("==", ast.Field("dst_port", 2), ast.NumLit(80, 17), 2)


def test_columns_of_nodes():
    e = parse("!(tcp) && saddr in {10.0.0.1, 1..2}")
    assert e.col == 1 and e.operands[0].col == 1 and e.operands[0].operand.col == 3
    member = e.operands[1]
    assert member.col == 11 and member.container.col == 20
    assert [i.col for i in member.container.items] == [21, 31]


def test_containers():
    e = parse("dst_port in $lo..$hi")
    assert e.container == ast.Range(ast.Param("lo", 13), ast.Param("hi", 18), 13)
    assert isinstance(parse("saddr in @bad").container, ast.SetRef)
    assert parse("saddr in 10.0.0.0/8").container.cidr
    items = parse("x in {1, $p, 2..3, ::1, 10.0.0.0/8}".replace("x", "dst_port")).container.items
    assert [type(i).__name__ for i in items] == ["NumLit", "Param", "Range", "AddrLit", "AddrLit"]


@pytest.mark.parametrize("name", ["local_port", "remote_port", "local_addr", "remote_addr"])
def test_aliases_are_kept_as_written(name):
    text = f"{name} in {{1, 2}}" if name.endswith("port") else f"{name} in 10.0.0.0/8"
    assert parse(text).subject == ast.Field(name, 1)
    assert analyze(text).text == text


def test_names_of_params_and_sets_may_be_keywords():
    c = analyze("dst_port == $in || dst_port in @and")
    assert c.params == ("in",) and c.sets == {"and": "number"}
