"""Every bad expression is one LangError with a message and the column of the offending text."""
import time

import pytest
from hypothesis import given, settings, strategies as st

from bpfwall.lang.checker import analyze, check
from bpfwall.lang.errors import LangError
from bpfwall.lang.evaluator import evaluate
from bpfwall.lang.packet import parse_packet
from bpfwall.lang.parser import MAX_DEPTH, MAX_NODES, MAX_TEXT, parse
from bpfwall.lang.printer import unparse
from tests.unit import packets as pk

BAD = [
    # types
    ("dst_port && udp", "dst_port is a number; compare it, e.g. dst_port == 53", 1),
    ("tcp && len", "len is a number; compare it, e.g. len <= 1500", 8),
    ("saddr", "saddr is an address; compare it, e.g. saddr == 10.0.0.1 or saddr in 10.0.0.0/8", 1),
    ("!remote_addr", "remote_addr is an address", 2),
    ("80", "80 is a number; compare it, e.g. dst_port == 80", 1),
    # pothos habits: C's FILTER=1 / FILTER=0, and C's octal literals
    ("1", "1 is a number, not a condition; write true (1 → true, 0 → false)", 1),
    ("0", "0 is a number, not a condition; write false", 1),
    ("tcp && 0", "0 is a number, not a condition; write false", 8),
    ("dst_port == 053", "053 has a leading zero: decimal 53, or 43 as C reads it (octal); write 53, "
     "or 0x2b for the octal value", 13),
    ("dst_port in {80, 089}", "089 has a leading zero: decimal 89 (not a valid C octal number); write 89", 18),
    ("dst_port in 01..5", "01 has a leading zero; write 1", 13),
    ("tcp || $p", "$p is a number; compare it, e.g. dst_port == $p", 8),
    ("10.0.0.1", "10.0.0.1 is an address; compare it, e.g. saddr == 10.0.0.1", 1),
    ("10.0.0.0/8 && tcp", "10.0.0.0/8 is an address; compare it, e.g. saddr in 10.0.0.0/8", 1),
    ("tcp == 1", "tcp is a boolean; use it directly (tcp, !tcp)", 1),
    ("dst_port != udp", "udp is a boolean; use it directly (udp, !udp)", 13),
    ("tcp in 1..5", "tcp is a boolean", 1),
    ("true == 1", "true is a boolean", 1),
    ("(tcp && udp) == 1", "(tcp && udp) is a condition, not a value", 2),
    # names
    ("dts_port == 53", "unknown name 'dts_port'; did you mean 'dst_port'", 1),
    ("port == 80", "unknown name 'port'; did you mean 'dst_port', 'src_port' or 'local_port'?", 1),
    ("tcp && xyzzy", "unknown name 'xyzzy'", 8),
    ("tcp AND udp", "unexpected 'AND'; expected '&&', '||' or the end of the expression; did you mean 'and'?", 5),
    # numbers vs addresses
    ("dst_port == 10.0.0.1", "cannot compare dst_port (a number) with 10.0.0.1 (an address)", 13),
    ("::1 != $p", "cannot compare ::1 (an address) with $p (a number)", 8),
    ("saddr < 10.0.0.1", "addresses have no order; use ==, != or in", 1),
    ("daddr >= saddr", "addresses have no order", 1),
    ("saddr == 10.0.0.0/8", "use 'in' to match a network: saddr in 10.0.0.0/8", 10),
    ("saddr in 10.0.0.1..10.0.0.255", "address ranges are not supported; use a network instead: {10.0.0.1/32", 10),
    ("saddr in 10.0.0.0..10.0.0.255", "use a network instead: 10.0.0.0/24", 10),
    ("saddr in 10.0.0.1/8", "10.0.0.1/8 has host bits set; did you mean 10.0.0.0/8?", 10),
    ("daddr in {fe80::1/10}", "fe80::1/10 has host bits set; did you mean fe80::/10?", 11),
    ("saddr in 10.0.0.0/33", "prefix /33 is too long for an IPv4 address (at most /32)", 10),
    ("daddr in ::/129", "prefix /129 is too long for an IPv6 address (at most /128)", 10),
    ("saddr in 1..5", "cannot match saddr (an address) against a range of numbers", 10),
    ("dst_port in 10.0.0.0/8", "cannot match dst_port (a number) against a network", 13),
    ("daddr in {1, 2}", "cannot match daddr (an address) against a set of numbers", 10),
    ("dst_port in {80, 10.0.0.1}", "a set cannot mix numbers and addresses", 18),
    ("dst_port in 1..10.0.0.1", "a range cannot mix numbers and addresses", 13),
    # literal ranges
    ("dst_port == 70000", "70000 is out of range for dst_port (0..65535)", 13),
    ("70000 > remote_port", "70000 is out of range for remote_port (0..65535)", 1),
    ("icmp_type == 256", "256 is out of range for icmp_type (0..255)", 14),
    ("len > 4294967296", "4294967296 is out of range for len (0..4294967295)", 7),
    ("$p == 18446744073709551616", "18446744073709551616 is out of range (0..18446744073709551615)", 7),
    ("1 < 0x10000000000000000", "18446744073709551616 is out of range", 5),
    ("dst_port in 1..70000", "70000 is out of range for dst_port (0..65535)", 16),
    ("icmp_code in {1, 2..300}", "300 is out of range for icmp_code (0..255)", 21),
    ("dst_port == " + "9" * 50, "a 167-bit number is out of range for dst_port", 13),
    ("dst_port in 5..1", "empty range 5..1", 13),
    ("dst_port in {1, 9..8}", "empty range 9..8", 17),
    ("dst_port in {}", "an empty set matches nothing", 13),
    # sets
    ("dst_port in @s || saddr in @s", "@s is used as a number set and as an address set", 28),
    ("$p in @s", "only a packet field can be looked up in @s", 1),
    ("53 in @s", "only a packet field can be looked up in @s", 1),
    ("@web", "a set can only follow 'in', e.g. dst_port in @web", 1),
    ("{80}", "a set can only follow 'in'", 1),
    ("dst_port in 80", "'in' needs a range, a set or a network; to match one number write dst_port == 80", 13),
    ("saddr in 10.0.0.1", "to match one address write saddr == 10.0.0.1", 10),
    # syntax
    ("1 < dst_port < 5", "comparisons cannot be chained", 14),
    ("dst_port == 1 in 1..2", "comparisons cannot be chained", 15),
    ("dst_port = 80", "'=' is not an operator; use '==' to compare", 10),
    ("tcp & udp", "'&' is not an operator; use '&&'", 5),
    ("tcp | udp", "'|' is not an operator; use '||'", 5),
    ("tcp # udp", "unexpected character '#'", 5),
    ("tcp && dst_port == 'x'", "unexpected character \"'\"", 20),
    ("(tcp || udp", "missing ')' to close the '(' at column 1", 12),
    ("tcp)", "unmatched ')'", 4),
    ("(tcp udp)", "unexpected 'udp'; expected '&&', '||' or ')'", 6),
    ("tcp &&", "unexpected end of expression; expected a condition or a value", 7),
    ("|| tcp", "unexpected '||'; expected a condition or a value", 1),
    ("!", "unexpected end of expression", 2),
    ("", "empty expression", 1),
    ("   ", "empty expression", 1),
    ("tcp udp", "unexpected 'udp'; expected '&&', '||' or the end of the expression", 5),
    ("dst_port in", "expected a range (1..5), a set ({…} or @name) or a network after 'in'", 12),
    ("dst_port in 1..", "expected a number or $param after '..'", 16),
    ("dst_port in {80,", "expected a number, $param, range or address in the set", 17),
    ("dst_port in {80 443}", "unexpected '443'; expected ',' or '}'", 17),
    ("dst_port in {80", "missing '}' to close the '{' at column 13", 16),
    # literals
    ("dst_port == 0x", "expected hex digits after '0x'", 13),
    ("dst_port == 80abc", "invalid number '80abc'", 13),
    ("saddr == 10.0.0.1x", "invalid address '10.0.0.1x'", 10),
    ("saddr == 300.1.1.1", "'300.1.1.1' is not a valid IPv4 address", 10),
    ("saddr == 10.0.0", "'10.0.0' is not a valid IPv4 address", 10),
    ("saddr == 010.0.0.1", "'010.0.0.1' is not a valid IPv4 address", 10),
    ("daddr == 1:2", "'1:2' is not a valid IPv6 address", 10),
    ("daddr == fe80::1::2", "'fe80::1::2' is not a valid IPv6 address", 10),
    ("saddr in 10.0.0.0/", "expected a prefix length after '10.0.0.0/'", 10),
    ("$ == 1", "expected a parameter name after '$'", 1),
    ("dst_port in @", "expected a set name after '@'", 13),
]


def test_enough_cases():
    assert len(BAD) >= 45


@pytest.mark.parametrize("text,message,col", BAD, ids=[t or "<empty>" for t, _, _ in BAD])
def test_bad_expression(text, message, col):
    with pytest.raises(LangError) as info:
        analyze(text)
    e = info.value
    assert message in e.message
    assert e.col == col
    assert e.text == text
    assert str(e) == f"column {col}: {e.message}" and "\n" not in str(e)


def test_render_puts_the_caret_under_the_column():
    with pytest.raises(LangError) as info:
        analyze("tcp && dts_port == 53")
    assert info.value.render() == (
        "column 8: unknown name 'dts_port'; did you mean 'dst_port', 'src_port' or 'remote_port'?\n"
        "  tcp && dts_port == 53\n"
        "         ^")


def test_render_keeps_the_caret_aligned_after_tabs_and_newlines():
    with pytest.raises(LangError) as info:
        analyze("tcp\t&&\n\tdst_port")
    lines = info.value.render().splitlines()
    assert lines[1] == "  tcp &&  dst_port"
    assert lines[2].index("^") == lines[1].index("dst_port")


def test_render_at_the_end_of_the_text():
    with pytest.raises(LangError) as info:
        analyze("tcp &&")
    assert info.value.render().splitlines()[2] == "        ^"


def test_render_windows_long_expressions():
    text = " || ".join(f"dst_port == {i}" for i in range(40)) + " || dst_port == 70000"
    with pytest.raises(LangError) as info:
        analyze(text)
    e = info.value
    line, caret = e.render().splitlines()[1:]
    assert len(line) < 80 and line.startswith("  …")
    assert line[caret.index("^"):].startswith("70000")


def test_render_windows_in_the_middle():
    text = "tcp || " * 20 + "xx || " + "udp || " * 20 + "ip"
    with pytest.raises(LangError) as info:
        analyze(text)
    line, caret = info.value.render().splitlines()[1:]
    assert line.startswith("  …") and line.endswith("…")
    assert line[caret.index("^"):].startswith("xx ||")


def test_errors_without_a_column():
    e = LangError("set @s: bad")
    assert str(e) == "set @s: bad" and e.render() == "set @s: bad" and e.col is None


# -- limits ------------------------------------------------------------------

def test_text_too_long():
    text = "tcp || " * (MAX_TEXT // 7) + "udp"
    with pytest.raises(LangError, match=r"expression is too long \(\d+ characters; at most 65536\)"):
        analyze(text)


def test_too_many_nodes():
    text = "||".join(["$a==1"] * (MAX_NODES // 3 + 1))
    assert len(text) < MAX_TEXT
    with pytest.raises(LangError, match="expression is too large") as info:
        analyze(text)
    assert info.value.col is not None


def test_largest_accepted_nodes():
    analyze("||".join(["$a==1"] * (MAX_NODES // 3 - 1)))


@pytest.mark.parametrize("opener,closer", [("(", ")"), ("!", ""), ("!(", ")")])
def test_nesting_limit(opener, closer):
    ok = opener * (MAX_DEPTH // len(opener)) + "tcp" + closer * (MAX_DEPTH // len(opener))
    analyze(ok)
    deep = opener * (MAX_DEPTH + 1) + "tcp" + closer * (MAX_DEPTH + 1)
    with pytest.raises(LangError, match="nests too deeply") as info:
        analyze(deep)
    assert info.value.col == MAX_DEPTH + 1


def test_deepest_expression_evaluates_and_prints():
    text = "!(tcp || " * (MAX_DEPTH // 2) + "udp" + ")" * (MAX_DEPTH // 2)
    c = analyze(text)
    assert analyze(c.text).text == c.text
    evaluate(c.expr, parse_packet(pk.ipv4("10.0.0.1", "10.0.0.2", pk.UDP, pk.udp(1, 2))), "ingress")


def test_huge_chain_is_fast():
    """10000 operands: no recursion per operand anywhere (limits lifted: it exceeds them)."""
    text = " || ".join(f"dst_port == {i}" for i in range(1, 10001))
    packet = parse_packet(pk.ipv4("10.0.0.1", "10.0.0.2", pk.UDP, pk.udp(1, 20000)))
    start = time.perf_counter()
    expr = parse(text, max_text=None, max_nodes=None)
    checked = check(expr, text)
    assert unparse(expr) == text == checked.text
    assert evaluate(expr, packet, "ingress") is False
    assert time.perf_counter() - start < 1.0
    assert len(expr.operands) == 10000


def test_largest_chain_within_limits_is_fast():
    text = "||".join(f"dst_port=={i}" for i in range(4000))
    assert len(text) <= MAX_TEXT
    start = time.perf_counter()
    c = analyze(text)
    evaluate(c.expr, parse_packet(pk.ipv4("10.0.0.1", "10.0.0.2", pk.UDP, pk.udp(1, 20000))), "egress")
    assert time.perf_counter() - start < 1.0


# -- anything else is a LangError, never a crash ---------------------------------

_PIECES = st.sampled_from(["tcp", "dst_port", "saddr", "local_addr", "$p", "@s", "80", "0x1f", "70000",
                           "10.0.0.1", "10.0.0.0/8", "::1", "fe80::/10", "1..5", "{", "}", ",", "(", ")", "!",
                           "&&", "||", "==", "<", "in", "not", "..", "/", ":", ".", "=", "é", "٣", " "])


@settings(max_examples=500)
@given(st.one_of(st.text(max_size=40), st.lists(_PIECES, max_size=12).map("".join),
                 st.lists(_PIECES, max_size=12).map(" ".join)))
def test_any_text_is_accepted_or_refused_cleanly(text):
    try:
        checked = analyze(text)
    except LangError as e:
        assert e.col is None or 1 <= e.col <= len(text) + 1
        assert "\n" not in str(e)
        e.render()
    else:
        assert analyze(checked.text).text == checked.text


def test_deepest_alternating_nesting():
    """200 levels of alternating || / && (the deepest trees) parse, check, print and evaluate to the bottom."""
    text = "".join("ip || (" if level % 2 == 0 else "ipv6 && (" for level in range(MAX_DEPTH))
    c = analyze(text + "udp" + ")" * MAX_DEPTH)
    assert analyze(c.text).text == c.text
    assert evaluate(c.expr, parse_packet(pk.ipv6("::1", "::2", pk.UDP, pk.udp(1, 2))), "ingress")
    assert not evaluate(c.expr, parse_packet(pk.ipv6("::1", "::2", pk.TCP, pk.tcp(1, 2))), "ingress")
