"""Packets for the benchmarks: raw L3 bytes (IPv4/IPv6 × TCP/UDP/ICMP)."""
import socket
import struct

A4, B4 = socket.inet_aton("10.0.0.1"), socket.inet_aton("10.0.0.2")
A6, B6 = socket.inet_pton(socket.AF_INET6, "2001:db8::1"), socket.inet_pton(socket.AF_INET6, "2001:db8::2")


def v4(proto: int, l4: bytes) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0, 64, proto, 0, A4, B4) + l4


def v6(nh: int, l4: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(l4), nh, 64, A6, B6) + l4


def udp(dport: int, payload: bytes = b"q" * 32) -> bytes:
    return struct.pack("!HHHH", 40000, dport, 8 + len(payload), 0) + payload


def tcp(dport: int) -> bytes:
    return struct.pack("!HHIIBBHHH", 40000, dport, 1, 0, 5 << 4, 0x02, 65535, 0, 0)


def icmp(kind: int) -> bytes:
    return struct.pack("!BBHHH", kind, 0, 0, 1, 1) + b"x" * 16


PACKETS = {
    "ipv4/udp:53": v4(17, udp(53)),
    "ipv4/tcp:80": v4(6, tcp(80)),
    "ipv4/tcp:22": v4(6, tcp(22)),
    "ipv4/icmp": v4(1, icmp(8)),
    "ipv6/udp:53": v6(17, udp(53)),
    "ipv6/tcp:80": v6(6, tcp(80)),
    "ipv6/tcp:22": v6(6, tcp(22)),
    "ipv6/icmp": v6(58, icmp(128)),
}


# The filter the per-packet benches measure (per_packet, slice_guard, ifname, compilers, load_time):
# DNS, web and ICMP, as a small unit's policy reads.
FILTER = "icmp || (udp && dst_port == 53) || (tcp && dst_port == 80)"


# The baseline every per-packet bench runs in the same rounds: `r0 = 1; exit`, what
# BPF_PROG_TEST_RUN itself costs (skb set-up, the call) with no filter in it.
EMPTY = struct.pack("<BBhi", 0xB7, 0, 0, 1) + struct.pack("<BBhi", 0x95, 0, 0, 0)


def load_empty() -> int:
    """The fd of the empty cgroup_skb program (the caller closes it)."""
    from bpfwall.kernel import progs, syscall

    return progs.prog_load(syscall.BPF_PROG_TYPE_CGROUP_SKB, EMPTY, "GPL", syscall.BPF_CGROUP_INET_INGRESS, "empty")
