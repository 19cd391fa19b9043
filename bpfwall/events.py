"""Drop events: what a unit's filter dropped (or, in audit mode, would have dropped), one record
a packet, the same for both backends (bpf: a ring buffer the program writes on its drop path;
nft: `log group` rules read over nfnetlink_log).

Shown as a firewall log line by `bpfwall monitor`, as JSON with --json, and forwarded to the
journal by the watcher with structured fields.
"""
from __future__ import annotations

import datetime
import functools
import ipaddress
from dataclasses import asdict, dataclass

PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}


@functools.lru_cache(maxsize=64)
def _clock(second: int) -> str:
    """HH:MM:SS (local time) of a second: the same for every event in it (monitor shows 100,000 a
    second, and formatting the time anew was half of a line's cost)."""
    return datetime.datetime.fromtimestamp(second).strftime("%H:%M:%S")


@dataclass(frozen=True)
class DropEvent:
    time: float                 # seconds since the epoch
    unit: str
    direction: str              # "ingress" | "egress"
    verdict: str                # "drop" | "audit" (audit mode: it passed, but would have been dropped)
    family: int                 # 4 | 6 (0: not IP)
    proto: int | None           # IP protocol / final IPv6 next header; None when it cannot be known
    saddr: str | None
    daddr: str | None
    sport: int                  # 0 when the packet has no ports
    dport: int
    icmp_type: int | None
    icmp_code: int | None
    length: int                 # bytes of the L3 packet
    cgroup_id: int = 0          # the socket's cgroup (bpf; 0 where the backend cannot tell)

    @property
    def proto_name(self) -> str:
        if self.proto is None:
            return "?"
        return PROTO_NAMES.get(self.proto, str(self.proto))

    def endpoint(self, addr: str | None, port: int) -> str:
        if addr is None:
            return "?"
        if self.proto in (6, 17):
            return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
        return addr

    def line(self) -> str:
        """`12:03:01.123 nginx.service ingress DROP tcp 203.0.113.9:51234 → 10.0.0.2:22 len 60`"""
        ms = int(self.time * 1000)
        when = f"{_clock(ms // 1000)}.{ms % 1000:03d}"
        what = "DROP" if self.verdict == "drop" else "AUDIT"
        text = (f"{when} {self.unit} {self.direction} {what} {self.proto_name} "
                f"{self.endpoint(self.saddr, self.sport)} → {self.endpoint(self.daddr, self.dport)}")
        if self.icmp_type is not None:
            text += f" type {self.icmp_type} code {self.icmp_code}"
        return text + f" len {self.length}"

    def as_json(self) -> dict:
        out = asdict(self)
        out["proto"] = self.proto_name
        return out

    def journal_fields(self) -> dict[str, str]:
        """Structured fields for journald (the watcher forwards events with them)."""
        fields = {"UNIT": self.unit, "BPFWALL_DIRECTION": self.direction,
                  "BPFWALL_VERDICT": self.verdict.upper(), "PROTO": self.proto_name,
                  "SRC": self.saddr or "", "DST": self.daddr or "", "LEN": str(self.length)}
        if self.proto in (6, 17):
            fields.update(SPT=str(self.sport), DPT=str(self.dport))
        if self.icmp_type is not None:
            fields.update(ICMP_TYPE=str(self.icmp_type), ICMP_CODE=str(self.icmp_code))
        return fields


def address(family: int, raw: bytes) -> str | None:
    """The text of an address as the program reports it (16 bytes; IPv4 in the first 4)."""
    if family == 4:
        return str(ipaddress.IPv4Address(raw[:4]))
    if family == 6:
        return str(ipaddress.IPv6Address(raw[:16]))
    return None


# Per unit and direction: at most `log_rate` events a second, `log_burst` at once (a token
# bucket); log_rate = 0: no events. Settable in the policy, with --log-rate/--log-burst and `set`.
DEFAULT_LOG_RATE = 100
DEFAULT_LOG_BURST = 200
LOG_RATE_MAX = 1_000_000
LOG_BURST_MAX = 1_000_000


def check_log_setting(name: str, value) -> int:
    """`value` as log_rate (0..LOG_RATE_MAX) or log_burst (1..LOG_BURST_MAX); ValueError naming it."""
    lo, hi = (0, LOG_RATE_MAX) if name == "log_rate" else (1, LOG_BURST_MAX)
    if type(value) is not int or not lo <= value <= hi:
        raise ValueError(f"{name}={value}: expected an integer {lo}..{hi}")
    return value
