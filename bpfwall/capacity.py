"""What a set capacity costs in kernel memory, and the bound above which it must be forced.

Each @set of a unit is one map of `capacity` entries (lower/c.py):

- a number set is a BPF_MAP_TYPE_HASH of u32 → u8, preallocated: the kernel
  takes all of its memory when the unit is loaded, empty or not;
- an address set is a BPF_MAP_TYPE_LPM_TRIE with BPF_F_NO_PREALLOC: it takes
  memory as it fills, up to `capacity` elements.

The figures below were measured on Linux 6.18 (x86_64) by creating maps and
reading `memlock:` from /proc/self/fdinfo/<map fd> (tests/kernel/test_sets.py
checks them against the running kernel):

- hash of u32 → u8 with N entries: 64·N (elements) + 16·N rounded up to a power
  of two (buckets) + 896 + 104 per possible CPU — exact for every N tried from
  1 to 1,048,577. So 16,777,216 costs 1.25 GiB per number set.
- LPM trie: fdinfo reports 42 bytes per element, but the kernel counts only
  its leaves; /proc/slabinfo grew by 128 bytes per element while filling one
  with 100,000 random /32s (a 64-byte leaf and a 64-byte intermediate node
  each). The estimate takes 128.
"""
from __future__ import annotations

from .errors import Error

HASH_ELEMENT = 64
HASH_BUCKET = 16
HASH_FIXED = 896
HASH_PER_CPU = 104
LPM_ELEMENT = 128

# More than this per unit must be asked for (--force-capacity, force_capacity = true).
UNFORCED_LIMIT = 256 << 20
CAPACITY_MAX = 1 << 24  # never, forced or not


class CapacityError(Error):
    """A set capacity refused: its memory estimate is over the bound and it was not forced."""


def _power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def set_map_bytes(kind: str, capacity: int) -> int:
    """Kernel memory of one set's map: a number set's from load on, an address set's when full."""
    if kind == "number":
        from .kernel.syscall import possible_cpus

        return (HASH_ELEMENT * capacity + HASH_BUCKET * _power_of_two(capacity)
                + HASH_FIXED + HASH_PER_CPU * possible_cpus())
    return LPM_ELEMENT * capacity


def estimate(sets: dict[str, str], capacity: int) -> int:
    """Kernel memory the unit's sets (name → kind) can take at `capacity`, at most."""
    return sum(set_map_bytes(kind, capacity) for kind in sets.values())


def show_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f}".removesuffix(".0") + f" {unit}"
    return f"{n} bytes"


def describe(sets: dict[str, str], capacity: int) -> str:
    """'4 number sets of 1.3 GiB each, taken when loaded'."""
    parts = []
    for kind, when in (("number", "taken when loaded"), ("address", "when full")):
        n = sum(1 for k in sets.values() if k == kind)
        if n:
            each = show_bytes(set_map_bytes(kind, capacity))
            parts.append(f"{n} {kind} set{'s' if n > 1 else ''} of {each}{' each' if n > 1 else ''}, {when}")
    return "; ".join(parts)


def check(sets: dict[str, str], capacity: int, forced: bool, what: str, force: str) -> None:
    """Refuse a capacity out of range, or one whose sets (name → kind) would take more than
    UNFORCED_LIMIT unless `forced`. `what` heads the message ("--set-capacity 16777216"; empty:
    none), `force` says how to force it ("--force-capacity")."""
    head = f"{what}: " if what else ""
    if not 1 <= capacity <= CAPACITY_MAX:
        raise CapacityError(f"{head}must be between 1 and {CAPACITY_MAX}")
    total = estimate(sets, capacity)
    if forced or total <= UNFORCED_LIMIT:
        return
    raise CapacityError(f"{head}the unit's sets would take about {show_bytes(total)} of kernel memory "
                        f"({describe(sets, capacity)}); bpfwall takes at most {show_bytes(UNFORCED_LIMIT)} "
                        f"per unit unless forced with {force}")
