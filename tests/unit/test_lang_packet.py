"""parse_packet: the header walk the kernel program must reproduce."""
import ipaddress

import pytest
from hypothesis import given

from bpfwall.lang.errors import PacketError
from bpfwall.lang.packet import as_dict, parse_packet
from tests.strategies import packets
from tests.unit import packets as pk

A4, B4 = "10.0.0.1", "192.168.1.1"
A6, B6 = "2001:db8::1", "fe80::1"


def v6(kinds, final=pk.UDP, l4=None):
    nh, headers = pk.chain(kinds, final)
    return parse_packet(pk.ipv6(A6, B6, nh, headers + (pk.udp(1111, 53) if l4 is None else l4)))


def test_ipv4_udp():
    f = parse_packet(pk.ipv4(A4, B4, pk.UDP, pk.udp(1234, 53, b"hi")))
    assert (f.family, f.proto, f.l4, f.src_port, f.dst_port, f.length) == (4, 17, True, 1234, 53, 30)
    assert f.saddr == ipaddress.ip_address(A4) and f.daddr == ipaddress.ip_address(B4)
    assert (f.ip, f.ipv6, f.tcp, f.udp, f.icmp) == (True, False, False, True, False)


def test_ipv4_options_move_the_ports():
    f = parse_packet(pk.ipv4(A4, B4, pk.TCP, pk.tcp(80, 8080), options=bytes(40)))
    assert (f.src_port, f.dst_port) == (80, 8080)


@pytest.mark.parametrize("ihl", [0, 4, 15])
def test_ipv4_bad_ihl_means_no_protocol(ihl):
    f = parse_packet(pk.ipv4(A4, B4, pk.TCP, pk.tcp(80, 8080), ihl=ihl))
    assert f.proto is None and not f.l4 and not f.tcp and (f.src_port, f.dst_port) == (0, 0)


def test_ipv4_ihl_exactly_the_packet():
    f = parse_packet(pk.ipv4(A4, B4, pk.UDP, options=bytes(8)))
    assert f.udp and f.l4 and f.dst_port == 0


def test_ipv4_fragments():
    first = parse_packet(pk.ipv4(A4, B4, pk.UDP, pk.udp(1, 53), more_fragments=True))
    assert first.l4 and first.dst_port == 53
    later = parse_packet(pk.ipv4(A4, B4, pk.UDP, pk.udp(1, 53), frag_offset=1))
    assert later.udp and not later.l4 and later.dst_port == 0


@pytest.mark.parametrize("payload,ports", [(0, (0, 0)), (1, (0, 0)), (2, (0, 0)), (3, (0, 0)), (4, (7, 53))])
def test_short_l4_header(payload, ports):
    f = parse_packet(pk.ipv4(A4, B4, pk.UDP, pk.udp(7, 53)[:payload]))
    assert f.udp and (f.src_port, f.dst_port) == ports


@pytest.mark.parametrize("extra", range(5))
def test_udp_with_0_to_4_payload_bytes_has_ports(extra):
    f = parse_packet(pk.ipv4(A4, B4, pk.UDP, pk.udp(7, 53, bytes(extra))))
    assert (f.src_port, f.dst_port, f.length) == (7, 53, 28 + extra)


def test_icmp_and_icmpv6():
    f = parse_packet(pk.ipv4(A4, B4, pk.ICMP, pk.icmp(8, 0)))
    assert f.icmp and (f.icmp_type, f.icmp_code, f.src_port) == (8, 0, 0)
    f = parse_packet(pk.ipv6(A6, B6, pk.ICMPV6, pk.icmp(128, 3)))
    assert f.icmp and (f.icmp_type, f.icmp_code) == (128, 3)
    assert parse_packet(pk.ipv6(A6, B6, pk.ICMPV6, b"\x87")).icmp_type == 0  # one byte is not enough
    assert parse_packet(pk.ipv6(A6, B6, pk.ICMPV6, b"\x87\x01")).icmp_type == 0x87


def test_icmp_of_the_other_family_is_not_icmp():
    assert not parse_packet(pk.ipv4(A4, B4, pk.ICMPV6, pk.icmp(8, 0))).icmp
    f = parse_packet(pk.ipv6(A6, B6, pk.ICMP, pk.icmp(8, 0)))
    assert not f.icmp and f.icmp_type == 0


def test_other_protocol_reads_no_numbers():
    f = parse_packet(pk.ipv4(A4, B4, 47, bytes(range(1, 9))))
    assert f.proto == 47 and (f.src_port, f.dst_port, f.icmp_type) == (0, 0, 0)


@pytest.mark.parametrize("kind,units", [(pk.HOPOPTS, 0), (pk.ROUTING, 2), (pk.DSTOPTS, 1), (pk.AH, 1),
                                        (pk.AH, 4), (pk.FRAGMENT, 0)])
def test_ipv6_each_extension_header(kind, units):
    f = v6([(kind, units)])
    assert (f.proto, f.l4, f.src_port, f.dst_port) == (17, True, 1111, 53)


def test_ipv6_chain_of_eight_is_walked():
    f = v6([(pk.HOPOPTS, 0), (pk.DSTOPTS, 1), (pk.ROUTING, 0), (pk.AH, 2), (pk.FRAGMENT, 0),
            (pk.DSTOPTS, 0), (pk.AH, 1), (pk.DSTOPTS, 3)])
    assert f.udp and f.dst_port == 53


def test_ipv6_ninth_extension_header_gives_up():
    f = v6([(pk.DSTOPTS, 0)] * 9)
    assert f.proto is None and not f.l4 and not f.udp and f.dst_port == 0


def test_ipv6_non_first_fragment():
    f = v6([(pk.HOPOPTS, 0), (pk.FRAGMENT, 0, 100)], final=pk.TCP, l4=pk.tcp(1, 2))
    assert f.tcp and not f.l4 and f.dst_port == 0


def test_ipv6_fragment_offset_ignores_flag_bits():
    # offset 0 with the M flag and reserved bits set is a first fragment.
    nh, headers = pk.chain([(pk.FRAGMENT, 0)], pk.UDP)
    headers = headers[:3] + b"\x07" + headers[4:]
    f = parse_packet(pk.ipv6(A6, B6, nh, headers + pk.udp(1, 2)))
    assert f.l4 and f.dst_port == 2


@pytest.mark.parametrize("keep", [0, 1, 7])
def test_ipv6_truncated_chain(keep):
    nh, headers = pk.chain([(pk.FRAGMENT, 0)] if keep == 7 else [(pk.HOPOPTS, 0)], pk.UDP)
    f = parse_packet(pk.ipv6(A6, B6, nh, headers[:keep]))
    assert f.proto is None and f.dst_port == 0


def test_ipv6_header_beyond_the_packet():
    # The last header claims more bytes than there are: the protocol is known, the ports are not.
    nh, headers = pk.chain([(pk.HOPOPTS, 3)], pk.TCP)
    f = parse_packet(pk.ipv6(A6, B6, nh, headers[:10]))
    assert f.tcp and f.l4 and f.dst_port == 0


def test_ipv6_addresses_and_length():
    f = parse_packet(pk.ipv6("::ffff:10.0.0.1", "::1", pk.TCP, pk.tcp(1, 2)))
    assert f.family == 6 and f.saddr == ipaddress.ip_address("::ffff:10.0.0.1") and f.length == 60


@pytest.mark.parametrize("data,message", [
    (b"", "not an IPv4 or IPv6 packet (empty)"),
    (b"\x50" + bytes(40), "not an IPv4 or IPv6 packet (version 5)"),
    (b"\x00" * 40, "version 0"),
    (b"\x45" + bytes(18), "IPv4 packet too short (19 bytes"),
    (b"\x60" + bytes(38), "IPv6 packet too short (39 bytes"),
])
def test_not_a_packet(data, message):
    with pytest.raises(PacketError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_packet(data)


def test_as_dict():
    d = as_dict(parse_packet(pk.ipv6(A6, B6, pk.UDP, pk.udp(1, 2))))
    assert d == {"family": 6, "proto": 17, "l4": True, "ip": False, "ipv6": True, "tcp": False, "udp": True,
                 "icmp": False, "src_port": 1, "dst_port": 2, "icmp_type": 0, "icmp_code": 0, "length": 48,
                 "saddr": A6, "daddr": B6}


@given(packets())
def test_generated_packets_parse(data):
    f = parse_packet(data)
    assert f.length == len(data) and f.family in (4, 6)
    if not f.l4:
        assert (f.src_port, f.dst_port, f.icmp_type, f.icmp_code) == (0, 0, 0, 0)
