"""nfnetlink_log reader against real nft `log group` rules and real packets, in a netns of its own."""
from __future__ import annotations

import socket
import subprocess

import pytest

from bpfwall.lang.packet import parse_packet
from bpfwall.nft.nflog import NflogReader
from tests.kernel.realpackets import NetNamespace

pytestmark = [pytest.mark.kernel]

GROUP = 4711


def nft(ns: str, script: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=script, text=True, check=True,
                   capture_output=True)


@pytest.fixture
def netns():
    ns = NetNamespace().create()
    try:
        ns.enter()
        try:
            yield ns
        finally:
            ns.leave()
    finally:
        ns.remove()


def send_udp(port: int, count: int, family=socket.AF_INET, addr="127.0.0.1") -> None:
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        for i in range(count):
            try:
                s.sendto(b"x%d" % i, (addr, port))
            except PermissionError:
                pass  # dropped on output: EPERM, as a firewall drop is


def test_dropped_packets_arrive_with_prefix_and_payload(netns):
    nft(netns.name, f"""table inet bpfwall-test-nflog {{
        chain out {{ type filter hook output priority 0;
            udp dport 9 log group {GROUP} prefix "a.service egress" drop
        }}
    }}""")
    with NflogReader(GROUP) as reader:
        send_udp(9, 5)
        send_udp(10, 3)  # not logged
        got = []
        while len(got) < 5 and (batch := reader.read(timeout=2.0)):
            got += batch
    assert len(got) == 5 and reader.lost == 0
    for _i, p in enumerate(got):
        assert p.prefix == "a.service egress"
        pkt = parse_packet(p.payload)
        assert (str(pkt.daddr), pkt.dst_port, pkt.udp) == ("127.0.0.1", 9, True)
        assert p.outdev is not None and p.indev is None


def test_a_group_can_be_bound_once_and_errors_are_one_line(netns):
    with NflogReader(GROUP):
        with pytest.raises(Exception) as e:
            NflogReader(GROUP)
        assert "nflog group 4711" in str(e.value)
