"""The backends that put a unit's filters in place, behind one interface (base.py):

    bpf   cgroup_skb programs pinned under a pin root   (bpf_backend.py over bpf.py)
    nft   socket cgroupv2 verdict maps in one nft table (nft_backend.py over nft.py)

`create(name, …)` builds one; it is the only place that maps a name to a class. The
commands build the one the global options choose (commands/options.py), the watcher one
of each (`every`), since each policy entry names its own.
"""
from __future__ import annotations

from .base import Backend, Loaded, ProgramBackend

NAMES = ("bpf", "nft")

__all__ = ["NAMES", "Backend", "Loaded", "ProgramBackend", "create", "every", "programs"]


def create(name: str, *, pin_root: str | None = None, table: str | None = None, cache=None,
           log_group: int | None = None, compiler: str | None = None) -> Backend:
    """The backend `name` ("bpf" or "nft"): bpf pins under `pin_root` and compiles through
    `cache` with `compiler` (None: as each program says); nft keeps its units in table `table`
    (None: $BPFWALL_NFT_TABLE or "bpfwall")."""
    if name == "bpf":
        from .bpf import DEFAULT_PIN_ROOT
        from .bpf_backend import BpfBackend

        return BpfBackend(pin_root or DEFAULT_PIN_ROOT, cache, compiler)
    if name == "nft":
        from .nft_backend import NftBackend

        return NftBackend(table, log_group)
    raise ValueError(f"no backend {name!r}")


def every(*, pin_root: str | None = None, table: str | None = None, cache=None,
          compiler: str | None = None) -> dict[str, Backend]:
    """One backend of each kind, by name."""
    return {name: create(name, pin_root=pin_root, table=table, cache=cache, compiler=compiler) for name in NAMES}


def programs(backend: Backend, command: str) -> ProgramBackend:
    """`backend`, if its filters are pinned BPF programs (what `command` needs)."""
    if not isinstance(backend, ProgramBackend):
        from ..errors import UsageError

        raise UsageError(f"{command}: only the bpf backend has this command")
    return backend
