"""The drop event's renderings: the log line, JSON and journal fields."""
from __future__ import annotations

import time

from bpfwall.events import DropEvent, address


def event(**kw) -> DropEvent:
    base = dict(time=time.mktime((2026, 12, 2, 12, 3, 1, 0, 0, -1)) + 0.123, unit="nginx.service",
                direction="ingress", verdict="drop", family=4, proto=6, saddr="203.0.113.9",
                daddr="10.0.0.2", sport=51234, dport=22, icmp_type=None, icmp_code=None, length=60)
    base.update(kw)
    return DropEvent(**base)


def test_line_reads_as_a_firewall_log():
    assert event().line() == "12:03:01.123 nginx.service ingress DROP tcp 203.0.113.9:51234 → 10.0.0.2:22 len 60"


def test_line_for_icmp_ipv6_and_audit():
    e = event(family=6, proto=58, saddr="2001:db8::1", daddr="2001:db8::2", sport=0, dport=0, icmp_type=128,
              icmp_code=0, verdict="audit", direction="egress", length=104)
    assert e.line() == "12:03:01.123 nginx.service egress AUDIT icmpv6 2001:db8::1 → 2001:db8::2 type 128 code 0 len 104"
    assert event(family=6, proto=17, saddr="::1", daddr="::2", sport=5, dport=53).line().endswith(
        "udp [::1]:5 → [::2]:53 len 60")


def test_json_and_journal_fields():
    e = event()
    assert e.as_json()["proto"] == "tcp" and e.as_json()["dport"] == 22
    assert e.journal_fields() == {"UNIT": "nginx.service", "BPFWALL_DIRECTION": "ingress", "BPFWALL_VERDICT": "DROP",
                                  "PROTO": "tcp", "SRC": "203.0.113.9", "DST": "10.0.0.2", "LEN": "60",
                                  "SPT": "51234", "DPT": "22"}


def test_address_text():
    assert address(4, bytes([10, 0, 0, 1]) + bytes(12)) == "10.0.0.1"
    assert address(6, bytes(15) + b"\1") == "::1"
    assert address(0, bytes(16)) is None
