"""What Python and bpf/port_filter.c agree on, stated once.

The C side is port_filter.c plus the `bpfwall_filter.h` that lower/c.py
generates for a unit; this side is every map, key and value bpfwall reads or
writes. tests/unit/test_program_contract.py compiles a probe that includes
both and checks every layout (sizeof/offsetof, from the object's BTF) and
every value here against clang's, so a change to one side alone fails there.

Maps (each pinned under its name in the unit's directory):
  counters   PERCPU_ARRAY[4]   u32 slot → struct bpfwall_counter; slot = direction*2 + dropped
  mode       ARRAY[1]          0 → u32: 0 enforce, 1 audit (the program drops only in enforce)
  params     ARRAY[1]          0 → struct bpfwall_params: one u64 per $param, in name order
  meta       ARRAY[1]          0 → char[meta_size]: the unit's JSON description, NUL-padded
  events     RINGBUF[EVENTS_RING_BYTES]  struct bpfwall_event per drop (the unit's own ring: no unit id)
  log_limit  ARRAY[2]          direction → struct bpfwall_log_limit: the events' token bucket
  events_lost PERCPU_ARRAY[2]  direction → u64: events lost to the limit or a full ring
  set_<name> per @name         HASH u32 → u8 (numbers) or LPM_TRIE struct bpfwall_addr_key → u8
  guard      ARRAY[GUARD_SLOTS]  slice defaults only: id & (GUARD_SLOTS-1) → struct guard_slot {id, class}
  guard_more HASH[GUARD_CAPACITY] slice defaults only: u64 cgroup id → u32 class (ids whose slot is taken)
  ifaces     HASH[IFACES_CAPACITY]  struct bpfwall_iface_key → u64 (only when a filter reads ifname):
             the bits of the unit's interface names (meta "interfaces", bit i = name i) that the
             link's name matches, for each link that matches one; user space keeps it current
"""
from __future__ import annotations

import ctypes
import functools
import ipaddress
import struct
import time
from dataclasses import dataclass

from . import events
from .kernel import syscall as sc
from .lang.values import interface_matches

# -- the program -----------------------------------------------------------------

DIRECTIONS = ("ingress", "egress")  # index = enum DIR_INGRESS, DIR_EGRESS
PROG_SECTIONS = {"ingress": "cgroup_skb/ingress", "egress": "cgroup_skb/egress"}
MODES = ("enforce", "audit")        # index = enum MODE_ENFORCE, MODE_AUDIT

# -- map names -------------------------------------------------------------------

COUNTERS, MODE, PARAMS, META = "counters", "mode", "params", "meta"
EVENTS, LOG_LIMIT, EVENTS_LOST = "events", "log_limit", "events_lost"
GUARD, GUARD_MORE = "guard", "guard_more"
IFACES = "ifaces"
SET_PREFIX = "set_"


def set_map(name: str) -> str:
    """The map (C symbol and pin name) of @name."""
    return SET_PREFIX + name


# -- keys and values -------------------------------------------------------------

Index = ctypes.c_uint32  # key of every array map and of a number set


def number_key(value: int) -> bytes:
    return bytes(Index(value))


ZERO = number_key(0)  # the one entry of mode, params and meta


class Counter(ctypes.Structure):
    """struct bpfwall_counter: one CPU's count in one slot of `counters`."""
    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


COUNTER_SLOTS = 2 * len(DIRECTIONS)


def counter_slot(direction: str, dropped: bool) -> int:
    """COUNTER_SLOT(dir, dropped) of port_filter.c: per direction, so that softirq ingress and
    process-context egress never increment the same per-CPU slot."""
    return DIRECTIONS.index(direction) * 2 + int(dropped)


def sum_counters(per_cpu: list[bytes]) -> Counter:
    """One slot's counts summed over CPUs (Map.lookup_percpu's values)."""
    total = Counter()
    for raw in per_cpu:
        c = Counter.from_buffer_copy(raw)
        total.packets += c.packets
        total.bytes += c.bytes
    return total


Mode = ctypes.c_uint32


def mode_value(mode: str) -> bytes:
    return bytes(Mode(MODES.index(mode)))


def mode_name(raw: bytes) -> str:
    """What the program does with the value: it lets drops through only for MODE_AUDIT."""
    return "audit" if Mode.from_buffer_copy(raw).value == MODES.index("audit") else "enforce"


Param = ctypes.c_uint64


def params_type(n: int) -> type:
    """struct bpfwall_params of `n` params: u64 slots in name order (C allows no empty struct:
    with none it holds one unused u64)."""
    return Param * max(n, 1)


def encode_params(names: list[str], values: dict[str, int]) -> bytes:
    """The params value for `names` (the unit's param names, sorted); a param not in `values` is 0."""
    return bytes(params_type(len(names))(*(values.get(n, 0) for n in names)))


def decode_params(names: list[str], raw: bytes) -> dict[str, int]:
    slots = params_type(len(names)).from_buffer_copy(raw)
    return {name: slots[i] for i, name in enumerate(names)}


class AddrKey(ctypes.Structure):
    """struct bpfwall_addr_key (packed): an address set's LPM key. The family byte keeps IPv4
    and IPv6 apart exactly, so prefixlen counts it: FAMILY_BITS + the address's prefix."""
    _pack_ = 1
    _fields_ = [("prefixlen", ctypes.c_uint32), ("family", ctypes.c_uint8), ("addr", ctypes.c_uint8 * 16)]


FAMILY_BITS = 8  # ADDR_KEY_PREFIXLEN(bits) = FAMILY_BITS + bits


def address_key(net) -> bytes:
    """The key of network `net` (an ipaddress network; its address left-aligned in addr)."""
    return bytes(AddrKey(FAMILY_BITS + net.prefixlen, net.version,
                         (ctypes.c_uint8 * 16)(*net.network_address.packed)))


def network_of(key: bytes):
    k = AddrKey.from_buffer_copy(key)
    addr = bytes(k.addr)
    return ipaddress.ip_network((addr[:4] if k.family == 4 else addr, k.prefixlen - FAMILY_BITS))


SetValue = ctypes.c_uint8
PRESENT = bytes(SetValue(1))  # a set's value: the key is what matters


def key_of(kind: str, value) -> bytes:
    """A set's key for a number or a network (`kind`: "number" or "address")."""
    return number_key(value) if kind == "number" else address_key(value)


def value_of(kind: str, key: bytes):
    """A set map's key back as the number or network it holds."""
    return Index.from_buffer_copy(key).value if kind == "number" else network_of(key)


class IfaceKey(ctypes.Structure):
    """struct bpfwall_iface_key: a link, by the cookie of its network namespace and its ifindex
    (ifindexes are per namespace: a packet of another one never takes a link's bits)."""
    _fields_ = [("netns", ctypes.c_uint64), ("ifindex", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


IfaceBits = ctypes.c_uint64
IFACES_CAPACITY = 4096  # links whose name matches one of a unit's interface names (allocated on use)


def iface_key(netns: int, ifindex: int) -> bytes:
    return bytes(IfaceKey(netns, ifindex, 0))


def iface_bits(patterns: list[str], name: str) -> int:
    """The value of a link called `name`: bit i set when it matches patterns[i]."""
    return sum(1 << i for i, p in enumerate(patterns) if interface_matches(p, name))


META_STEP = 256


def meta_size(json_bytes: int) -> int:
    """BPFWALL_META_SIZE for a description of `json_bytes`: room for it and a NUL, in steps of
    META_STEP so that similar units share objects."""
    return (json_bytes // META_STEP + 1) * META_STEP


@functools.lru_cache(maxsize=None)
def meta_type(size: int) -> type:
    """struct bpfwall_meta of BPFWALL_META_SIZE `size`."""
    return type("Meta", (ctypes.Structure,), {"_fields_": [("json", ctypes.c_char * size)]})


def encode_meta(json: bytes, size: int) -> bytes:
    return json.ljust(size, b"\0")


def decode_meta(raw: bytes) -> bytes:
    return raw.split(b"\0", 1)[0]


# -- drop events -----------------------------------------------------------------

# The ring of one unit: 64 KiB hold ~900 records (64 bytes + an 8-byte header), several
# bursts at the default limit; per unit, so that a unit's records need no unit identifier
# and its ring goes with its pins (see README, "Drop events").
EVENTS_RING_BYTES = 64 * 1024
NO_PROTO = 0xFFFF
NSEC_PER_SEC = 1_000_000_000
LOG_LIMIT_MAX = 1_000_000     # largest log_rate and log_burst (keeps the bucket's arithmetic in u64)
LOG_RATE_DEFAULT = events.DEFAULT_LOG_RATE    # one default for both backends (events.py)
LOG_BURST_DEFAULT = events.DEFAULT_LOG_BURST
# The program wakes a ring's reader at most this often (a wakeup costs microseconds); a reader
# keeps polling on its own for longer than this plus a tick after its last record
# (backends/bpf_events.py).
WAKE_EVERY_NS = 10_000_000


class Event(ctypes.Structure):
    """struct bpfwall_event: one drop, as the program writes it into `events`."""
    _fields_ = [("time_ns", ctypes.c_uint64), ("cgroup_id", ctypes.c_uint64), ("len", ctypes.c_uint32),
                ("proto", ctypes.c_uint16), ("sport", ctypes.c_uint16), ("dport", ctypes.c_uint16),
                ("family", ctypes.c_uint8), ("direction", ctypes.c_uint8), ("verdict", ctypes.c_uint8),
                ("is_icmp", ctypes.c_uint8), ("icmp_type", ctypes.c_uint8), ("icmp_code", ctypes.c_uint8),
                ("saddr", ctypes.c_uint32 * 4), ("daddr", ctypes.c_uint32 * 4)]


class LogLimit(ctypes.Structure):
    """struct bpfwall_log_limit: the rate limit of one direction (a GCRA, see port_filter.c)."""
    _fields_ = [("rate", ctypes.c_uint32), ("burst", ctypes.c_uint32), ("interval_ns", ctypes.c_uint64),
                ("tolerance_ns", ctypes.c_uint64), ("jiffy_ns", ctypes.c_uint64), ("tat", ctypes.c_uint64),
                ("woken_ns", ctypes.c_uint64), ("clock_offset_ns", ctypes.c_uint64)]


# The program's clock ticks in jiffies; a jiffy is the coarse clock's resolution (the tick).
CLOCK_MONOTONIC_COARSE = 6  # Linux; the time module does not name it
JIFFY_NS = round(time.clock_getres(CLOCK_MONOTONIC_COARSE) * NSEC_PER_SEC)


def log_limit_value(rate: int, burst: int) -> bytes:
    """A new limit, from a full bucket (tat 0). The interval is rounded up, so that the program
    never grants more than `rate` events a second."""
    interval = -(-NSEC_PER_SEC // rate) if rate else 0
    return bytes(LogLimit(rate, burst, interval, (burst - 1) * interval if burst else 0, JIFFY_NS, 0, 0, 0))


def clock_offset_ns(raw: bytes) -> tuple[int, int]:
    """(woken_ns, clock_offset_ns) of a log_limit value: record times + the offset are
    CLOCK_MONOTONIC_COARSE (u64 arithmetic: the offset may be "negative")."""
    v = LogLimit.from_buffer_copy(raw)
    return v.woken_ns, v.clock_offset_ns


# struct bpfwall_log_limit before the GCRA (a spin lock, the rate, the burst, a token bucket):
# a unit loaded by that bpfwall keeps it pinned until it is loaded again.
_OLD_LOG_LIMIT = struct.Struct("=4xIQ16x")


def decode_log_limit(raw: bytes) -> tuple[int, int]:
    if len(raw) == _OLD_LOG_LIMIT.size:
        return _OLD_LOG_LIMIT.unpack(raw)
    v = LogLimit.from_buffer_copy(raw)
    return v.rate, v.burst


Lost = ctypes.c_uint64


def sum_lost(per_cpu: list[bytes]) -> int:
    return sum(Lost.from_buffer_copy(raw).value for raw in per_cpu)


# -- slice defaults: the guard's map ----------------------------------------------

# How a slice default's guard knows its descendants, by cgroup id (the watcher keeps it): a class
# is GUARD_CLASSIFIED plus guard_below(direction) for each direction a deeper filter judges. It is
# kept in `guard`, an array slot chosen by the id's low bits that holds the id (a free slot holds
# 0), or, when another id holds that slot, in the hash `guard_more`. A cgroup in neither is not
# classified yet (the program then asks its ancestors).
GUARD_SLOTS = 16384       # a power of 2
GUARD_CAPACITY = 65536    # guard_more
GUARD_CLASSIFIED = 1 << 2
GuardKey, GuardValue = ctypes.c_uint64, ctypes.c_uint32


class GuardSlot(ctypes.Structure):
    """struct guard_slot: one slot of `guard`."""
    _fields_ = [("cgroup_id", ctypes.c_uint64), ("class_bits", ctypes.c_uint32), ("unused", ctypes.c_uint32)]


def guard_below(direction: str) -> int:
    """GUARD_BELOW(dir) of port_filter.c."""
    return 1 << DIRECTIONS.index(direction)


def guard_class(below) -> int:
    """The class of a classified cgroup whose directions `below` a deeper filter judges."""
    return GUARD_CLASSIFIED | sum(guard_below(d) for d in set(below))


def below_of(value: int) -> frozenset[str]:
    return frozenset(d for d in DIRECTIONS if value & guard_below(d))


def guard_index(cgroup_id: int) -> bytes:
    """The key of the cgroup's slot in `guard`."""
    return number_key(cgroup_id & (GUARD_SLOTS - 1))


def guard_slot(cgroup_id: int, below) -> bytes:
    return bytes(GuardSlot(cgroup_id, guard_class(below), 0))


FREE_SLOT = bytes(GuardSlot(0, 0, 0))


def decode_guard_slot(raw: bytes) -> tuple[int, frozenset[str]]:
    """(cgroup id or 0 when free, the directions judged below) of one slot."""
    slot = GuardSlot.from_buffer_copy(raw)
    return slot.cgroup_id, below_of(slot.class_bits)


def guard_key(cgroup_id: int) -> bytes:
    """The key of `guard_more`."""
    return bytes(GuardKey(cgroup_id))


def guard_value(below) -> bytes:
    return bytes(GuardValue(guard_class(below)))


def decode_guard(key: bytes, value: bytes) -> tuple[int, frozenset[str]]:
    """(cgroup id, the directions judged below) of one entry of `guard_more`."""
    return GuardKey.from_buffer_copy(key).value, below_of(GuardValue.from_buffer_copy(value).value)


# -- the maps as a whole ---------------------------------------------------------

@dataclass(frozen=True)
class MapShape:
    """How a map is declared in the C: what the loader creates and the pins hold."""
    type: int
    key: type      # ctypes type of the key
    value: type    # ctypes type of the value
    max_entries: int
    flags: int = 0


def map_shapes(params: list[str], sets: dict[str, str], meta_bytes: int, set_capacity: int,
               slice_default: bool = False, interfaces: bool = False) -> dict[str, MapShape]:
    """Every map of a unit's program with these params, sets (name → kind) and meta size
    (`slice_default`: the program is a slice's guard; `interfaces`: a filter reads ifname)."""
    shapes = {
        COUNTERS: MapShape(sc.BPF_MAP_TYPE_PERCPU_ARRAY, Index, Counter, COUNTER_SLOTS),
        MODE: MapShape(sc.BPF_MAP_TYPE_ARRAY, Index, Mode, 1),
        PARAMS: MapShape(sc.BPF_MAP_TYPE_ARRAY, Index, params_type(len(params)), 1),
        META: MapShape(sc.BPF_MAP_TYPE_ARRAY, Index, meta_type(meta_size(meta_bytes)), 1),
        EVENTS: MapShape(sc.BPF_MAP_TYPE_RINGBUF, None, None, EVENTS_RING_BYTES),
        LOG_LIMIT: MapShape(sc.BPF_MAP_TYPE_ARRAY, Index, LogLimit, len(DIRECTIONS)),
        EVENTS_LOST: MapShape(sc.BPF_MAP_TYPE_PERCPU_ARRAY, Index, Lost, len(DIRECTIONS)),
    }
    if slice_default:
        shapes[GUARD] = MapShape(sc.BPF_MAP_TYPE_ARRAY, Index, GuardSlot, GUARD_SLOTS)
        shapes[GUARD_MORE] = MapShape(sc.BPF_MAP_TYPE_HASH, GuardKey, GuardValue, GUARD_CAPACITY, sc.BPF_F_NO_PREALLOC)
    for name, kind in sets.items():
        shapes[set_map(name)] = (
            MapShape(sc.BPF_MAP_TYPE_HASH, Index, SetValue, set_capacity) if kind == "number" else
            MapShape(sc.BPF_MAP_TYPE_LPM_TRIE, AddrKey, SetValue, set_capacity, sc.BPF_F_NO_PREALLOC))
    if interfaces:
        shapes[IFACES] = MapShape(sc.BPF_MAP_TYPE_HASH, IfaceKey, IfaceBits, IFACES_CAPACITY, sc.BPF_F_NO_PREALLOC)
    return shapes
