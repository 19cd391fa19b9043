"""Decoding the bpf program's event records (no kernel needed)."""
from __future__ import annotations

import ctypes

from bpfwall import program_contract as pc
from bpfwall.backends.bpf_events import RECORD, decode


def _words(packed: bytes):
    return (ctypes.c_uint32 * 4).from_buffer_copy(packed.ljust(16, b"\0"))


def test_the_struct_format_is_the_contract_record():
    assert RECORD.size == ctypes.sizeof(pc.Event)
    raw = bytes(pc.Event(5_000_000_000, 77, 60, 6, 51234, 22, 4, 0, 0, 0, 0, 0,
                         _words(bytes([203, 0, 113, 9])), _words(bytes([10, 0, 0, 2]))))
    e = decode("nginx.service", raw, 100.0)
    assert (e.time, e.cgroup_id, e.length, e.proto, e.sport, e.dport) == (105.0, 77, 60, 6, 51234, 22)
    assert (e.unit, e.direction, e.verdict, e.family) == ("nginx.service", "ingress", "drop", 4)
    assert (e.saddr, e.daddr, e.icmp_type, e.icmp_code) == ("203.0.113.9", "10.0.0.2", None, None)
    assert e.line().endswith(" nginx.service ingress DROP tcp 203.0.113.9:51234 → 10.0.0.2:22 len 60")


def test_icmpv6_audit_egress_and_unknown_protocol():
    a = bytes.fromhex("20010db8000000000000000000000001")
    raw = bytes(pc.Event(0, 0, 48, 58, 0, 0, 6, 1, pc.MODES.index("audit"), 1, 128, 0, _words(a), _words(a)))
    e = decode("u", raw, 0.0)
    assert (e.direction, e.verdict, e.proto_name, e.icmp_type, e.icmp_code, e.saddr) == (
        "egress", "audit", "icmpv6", 128, 0, "2001:db8::1")
    raw = bytes(pc.Event(0, 0, 40, pc.NO_PROTO, 0, 0, 0, 0, 0, 0, 0, 0, _words(b""), _words(b"")))
    e = decode("u", raw, 0.0)
    assert (e.proto, e.saddr, e.family) == (None, None, 0)
