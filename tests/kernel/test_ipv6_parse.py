"""The IPv6 extension-header walk of bpf/port_filter.c: cheap to verify, and parsing exactly as
the reference (bpfwall/lang/packet.py) on every chain and every truncation.

The verifier's work is most of a unit's load time (`watch` at boot loads one unit per policy
entry), so it is pinned here by the kernel's own count (bpf_prog_info.verified_insns, Linux
5.16+): a deterministic figure, unlike a time.
"""
from __future__ import annotations

import ctypes
import itertools

import pytest

from bpfwall.backends import bpf
from bpfwall.build import UnitProgram, build
from bpfwall.kernel import loader, syscall as sc
from bpfwall.lang.checker import analyze, analyze_pair
from bpfwall.lang.evaluator import evaluate
from bpfwall.lang.packet import parse_packet
from tests.unit import packets as pk

pytestmark = pytest.mark.kernel

# The walk took ~15,000 verified instructions per program (a branch per header kind, so every
# sequence of kinds was walked); now ~1,300. The bound leaves room for other kernels' verifiers.
MAX_VERIFIED_INSNS = 4000


class _ProgInfo(sc.ProgInfoStruct):
    """struct bpf_prog_info up to verified_insns."""
    _fields_ = [("recursion_misses", ctypes.c_uint64), ("verified_insns", ctypes.c_uint32)]


def verified_insns(fd: int) -> int:
    info = _ProgInfo()
    attr = sc.InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=sc.addr(info))
    sc.bpf(sc.BPF_OBJ_GET_INFO_BY_FD, attr, f"cannot get info of program fd {fd}")
    return info.verified_insns


@pytest.mark.parametrize("load_bytes_only", [False, True])
@pytest.mark.parametrize("ingress,egress", [
    ("true", "true"),
    ("tcp && local_port in {80, 443} || icmp", "udp && dst_port == 53 || tcp"),
    ("icmp_type == 128 || remote_port in 1000..2000 && !udp", "len > 100 && ipv6"),
])
def test_every_program_is_cheap_to_verify(cache_dir, no_leaks, ingress, egress, load_bytes_only):
    program = UnitProgram(*analyze_pair(ingress, egress), load_bytes_only=load_bytes_only)
    loaded = loader.load(build(program, cache_dir))
    try:
        counts = {section: verified_insns(fd) for section, fd in loaded.progs.items()}
    finally:
        loaded.close()
    assert len(counts) == 2 and all(0 < n <= MAX_VERIFIED_INSNS for n in counts.values()), counts


def _chains():
    """Extension-header chains: every kind alone and after every kind, long chains at and over
    the walk's limit, and non-first fragments."""
    kinds = [(pk.HOPOPTS, 0), (pk.HOPOPTS, 2), (pk.ROUTING, 1), (pk.DSTOPTS, 0), (pk.AH, 0), (pk.AH, 3),
             (pk.FRAGMENT, 0, 0), (pk.FRAGMENT, 0, 1), (pk.FRAGMENT, 0, 0x1FFF)]
    yield []
    for a in kinds:
        yield [a]
    for a, b in itertools.product(kinds, repeat=2):
        yield [a, b]
    for n in (7, 8, 9, 10):
        yield [kinds[i % len(kinds)] for i in range(n)]
        yield [(pk.AH, 1)] * n


def _packets() -> list[bytes]:
    """v6 packets over every chain, whole and cut at every byte after the fixed header."""
    out = []
    finals = [(pk.TCP, pk.udp(1234, 443) + bytes(12)), (pk.UDP, pk.udp(1234, 443)),
              (pk.ICMPV6, bytes([128, 0, 0, 0])), (99, bytes(8))]
    for chain in _chains():
        for proto, l4 in finals:
            nh, headers = pk.chain(chain, proto)
            data = pk.ipv6("2001:db8::1", "2001:db8::2", nh, headers + l4)
            out.extend(data[:n] for n in range(40, len(data) + 1))
    return out


@pytest.mark.parametrize("load_bytes_only", [False, True])
def test_extension_header_chains_parse_as_the_reference(cache_dir, no_leaks, load_bytes_only):
    batch = _packets()
    # Each field the walk decides: the protocol, whether the ports were found (0 when absent), ICMPv6.
    for text in ("tcp", "udp", "icmp", "dst_port == 443", "src_port == 1234", "tcp && dst_port == 0",
                 "icmp_type == 128", "!tcp && !udp && !icmp"):
        checked = analyze(text)
        program = UnitProgram(checked, None, load_bytes_only=load_bytes_only)
        verdicts = bpf.test_run(program, "ingress", batch, cache=cache_dir)
        wrong = [data.hex() for data, verdict in zip(batch, verdicts, strict=False)
                 if verdict != evaluate(checked.expr, parse_packet(data), "ingress")]
        assert not wrong, f"{text}: {len(wrong)} of {len(batch)} packets differ from the reference, e.g. {wrong[0]}"
