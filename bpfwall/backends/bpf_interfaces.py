"""The bpf backend's guard in the watcher: keeps every unit's `ifaces` map current as devices
appear, go and are renamed.

A filter names interfaces (`ifname == "wg0"`, `"wlan*"`); the kernel program knows only the
packet's device as (network namespace, ifindex), so the names are matched here, against the
devices of this network namespace, and the result written to each unit's `ifaces` map
(backends/bpf.py PinnedUnit.write_interfaces). The guard listens to rtnetlink's link group:
RTM_NEWLINK (a device appears or is renamed) and RTM_DELLINK wake it, it reads the devices
again and rewrites what changed. Until it has, a new or renamed device is judged by what the
map said before: it matches no name if it is new, its old names if renamed (bench/
iface_reaction.py measures that window). A poll every POLL seconds repairs anything missed.
"""
from __future__ import annotations

import time

from ..errors import Error
from ..kernel import netdev
from . import bpf

POLL = 60.0


class InterfaceGuard:
    """Driven by the watcher's poll loop (fd, readable(), tick(), timeout_ms(), check(), close())."""

    def __init__(self, pin_root: str, log, poll: float = POLL):
        self.pin_root, self.log, self.poll = pin_root, log, poll
        self.monitor = netdev.LinkMonitor()  # subscribed before the first check: nothing slips between
        self.last = 0.0
        self._failing: str | None = None

    @property
    def fd(self) -> int:
        return self.monitor.fileno()

    def readable(self) -> None:
        if self.monitor.drain():
            self.check()

    def timeout_ms(self) -> int:
        return max(0, int((self.last + self.poll - time.monotonic()) * 1000) + 1)

    def tick(self) -> None:
        if time.monotonic() >= self.last + self.poll:
            self.check()

    def check(self) -> dict[str, int]:
        """Every unit that names interfaces brought up to date: {unit: devices that match}."""
        self.last = time.monotonic()
        try:
            done = bpf.refresh_interfaces(self.pin_root)
        except (Error, OSError) as e:
            if str(e) != self._failing:  # once per distinct failure, not once a poll
                self.log.error("interfaces", f"cannot update the units' interface names: {e}")
            self._failing = str(e)
            return {}
        self._failing = None
        for unit, n in done.items():
            self.log.debug("interfaces", f"{unit}: {n} device(s) match its interface names", unit=unit)
        return done

    def close(self) -> None:
        self.monitor.close()
