"""What a backend does, stated once: the operations the commands, `apply`, `run` and the
watcher use, whatever puts the filters in place.

Two implementations: BpfBackend (bpf_backend.py: cgroup_skb programs pinned under a
pin root) and NftBackend (nft_backend.py: `socket cgroupv2` verdict maps in one nft
table). `backends.create()` builds one from the global options; nothing outside the
factory asks which one it has. A capability one backend lacks is a property of the
backend (`ProgramBackend`, `Handle.exclusive`), not a branch on its name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

DIRECTIONS = ("ingress", "egress")


@dataclass
class Loaded:
    """What a load did: where each direction's filter is now, and the attachments it changed."""
    unit: str
    places: dict[str, str]  # direction → its filter: a pin path, or "table inet T chain C"
    replaced: list = field(default_factory=list)  # (cgroup, direction) that run the new filter
    attached: list = field(default_factory=list)  # (cgroup, direction) newly filtered
    detached: list = field(default_factory=list)  # (cgroup, direction) no longer filtered
    details: dict = field(default_factory=dict)   # what else `load --json` shows (the backend's own)


class Handle(Protocol):
    """One policy entry's unit as the watcher holds it: loaded, ready to attach."""
    name: str
    fingerprint: str  # of the policy entry it was loaded from
    backend: str      # the name of the backend that made it
    exclusive: bool   # a cgroup carries at most one unit of this backend: detach the other first
    needs_cleanup: bool  # a removed cgroup leaves something of the unit behind: call gone()
    # A slice default that judges only the descendants the watcher classifies for it (bpf: the
    # slice's guard program and its map; nft: a strict default's set of known cgroups); then
    # classify(cgroup_id, below, path), unclassify(cgroup_id) and keep_classified({id: path}) exist.
    guards: bool
    # Its filter also runs for the packets of every cgroup below the ones it is attached to, and
    # must pass with theirs (bpf: the kernel runs a socket's programs up to the root); the watcher
    # then builds a unit entry that has nearer entries below it as a guard (Entry.guards_nested).
    # False: only the nearest level's filter runs (nft: the dispatch chain).
    runs_below: bool

    @property
    def directions(self) -> list[str]: ...

    def attach(self, path: str) -> list[str]:
        """Filter the cgroup at `path` with the unit; the directions newly filtered."""

    def detach(self, path: str, directions=None) -> list[str]:
        """Stop filtering it (in `directions`, or all); the directions that were filtered."""

    def gone(self, path: str) -> bool:
        """The cgroup at `path` was removed: drop what the unit kept for it; whether it kept any."""

    def intact(self) -> bool:
        """Whether what the handle holds is still in place (not removed or replaced behind it)."""

    def close(self) -> None: ...


class EventSource(Protocol):
    """Drop events as they happen (bpfwall/events.py DropEvent), from one backend."""

    def fileno(self) -> int:
        """Readable when events may be waiting (for select/poll)."""

    def read(self, timeout: float | None = None) -> list:
        """The DropEvents waiting, after waiting up to `timeout` seconds (None: forever) for one."""

    def timeout(self) -> float | None:
        """Seconds until read(0) has work though fileno() is not readable (None: not before it is);
        a poll loop waits at most this long."""

    def lost(self) -> dict[tuple[str, str], int]:
        """(unit, direction) → events lost so far: to the rate limit or a full buffer, never silently."""

    def close(self) -> None: ...


class Backend(Protocol):
    name: str  # "bpf" | "nft": what policy entries and the watcher's records call it
    parallel: bool  # whether ensure() of several entries may run in threads at once

    # -- the commands ----------------------------------------------------------------------
    def load(self, unit: str, program, params: dict | None = None, sets: dict | None = None,
             mode: str | None = None, log: dict | None = None) -> Loaded:
        """Put `unit`'s filters in place; if it is loaded, replace them where they are attached
        (counters, mode, params and compatible sets are kept). A direction left out is removed.
        `log`: the drop events' limit {log_rate, log_burst} (either may be missing; kept if not given)."""

    def unload(self, unit: str) -> list[tuple[str, str]]:
        """Remove the unit everywhere; the (cgroup, direction) pairs it was detached from."""

    def attach(self, unit: str, cgroup_path: str) -> dict[str, bool]:
        """{direction: newly attached}"""

    def detach(self, unit: str, cgroup_path: str) -> dict[str, bool]:
        """{direction: was attached}"""

    def stats(self, unit: str) -> dict:
        """Counters, mode, params, sets and attachments (the JSON `stats --json` prints)."""

    def summary(self) -> list[dict]:
        """One row per loaded unit (the JSON `list --json` prints)."""

    def set_values(self, unit: str, changes: list) -> list[str]:
        """Apply ("param", name, value), ("mode", m), ("set", name, op, elements) changes all or
        nothing; a line for each change made."""

    def explain(self, checked, direction: str | None = None) -> tuple[dict, str]:
        """What the expression becomes here (nothing is loaded): (JSON data, text)."""

    def built_as_guard(self, unit: str) -> bool:
        """Whether the unit's loaded filter is a guard (a slice default's, or a unit entry's the
        watcher made one: watch/nesting.py), so that `apply` from the policy keeps it one."""

    def events(self, units: list[str] | None = None, state_dir: str | None = None) -> "EventSource":
        """Drop events of these units (None: every unit loaded now or later), as they happen;
        every reader sees every event (they meet in `state_dir`/events, default $BPFWALL_STATE_DIR
        or /run/bpfwall: fanout.py).
        `stats` reports each unit's event settings and losses as
        {"events": {"log_rate": N, "log_burst": N, "lost": {"ingress": N, "egress": N}}}."""

    # -- the watcher -----------------------------------------------------------------------
    def claim(self, state) -> None:
        """Before the watcher changes anything with this backend: check it can run here and
        take the locks that let one watcher alone manage it (`state`: watch/state.py State)."""

    def guard(self, log):
        """Something the watcher's loop polls to keep this backend's filters in place (fd,
        readable(), tick(), timeout_ms(), check(), close()), or None."""

    def prepare(self, entry) -> None:
        """Check and build the policy entry now, so a bad one stops a reload before any change."""

    def prepare_many(self, entries) -> None:
        """prepare() each entry (a backend may build them side by side)."""

    def ensure(self, entry, owned) -> tuple[Handle, str]:
        """The entry's unit, loaded (or reused when `owned`, the watcher's record, says it is
        unchanged): (handle, "reused" | "adopted" | "loaded")."""

    def owned(self, handle: Handle):
        """The watcher's record (watch/state.py Owned) of a unit it loaded."""

    def holds(self, owned) -> bool:
        """Whether a record of this backend names the place this backend manages now."""

    def where(self, owned) -> str:
        """The place a record names, for a log line ("the bpf backend", "nft table T")."""

    def release(self, unit: str, owned=None) -> list[tuple[str, str]]:
        """Unload a unit the watcher loaded (from where `owned` says); [] if it is gone already."""

    def refresh(self, handles: dict) -> list[tuple[str, str]]:
        """Index the attachments of the watcher's units (`handles`: name → Handle) before a full
        reconcile; the (unit, cgroup path) of removed cgroups it dropped meanwhile."""

    def ours_on(self, path: str) -> list[tuple[str, str]]:
        """(unit, direction) of the watcher's units that filter the cgroup at `path` itself."""

    # -- the watcher's records (nft: the table's state file) --------------------------------------
    def defer_records(self, on: bool) -> None:
        """On: the watcher's way, filters first — a change is made even when its record cannot be
        written (a full disk); the record waits in memory until retry_records() writes it."""

    def unrecorded(self) -> dict[str, str]:
        """{record file: why it could not be written} of the records waiting in memory."""

    def retry_records(self) -> None:
        """Write the waiting records again (an Error if one still cannot be written)."""

    def lost_records(self) -> list[str]:
        """Record files whose waiting record another process replaced since the last call: the
        changes it held are made but no longer recorded (the watcher reconciles)."""


@runtime_checkable
class ProgramBackend(Protocol):
    """A backend whose filters are BPF programs pinned in files: they can be pinned again
    elsewhere, handed to systemd (IP*FilterPath=), and run on test packets."""

    pin_root: str

    def prog_path(self, unit: str, direction: str) -> str: ...

    def unit_dir(self, unit: str) -> str: ...

    def program_ids(self, unit: str) -> dict[str, int]: ...

    def pin(self, unit: str, direction: str, path: str) -> str: ...

    def test_run(self, program, direction: str, packets: list[bytes], params: dict | None = None,
                 sets: dict | None = None, devices: list[str] | None = None) -> list[bool]:
        """`devices`: the device each packet comes by (default lo), which ifname reads."""
