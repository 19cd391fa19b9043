"""sd_notify(3) without libsystemd: one datagram of KEY=VALUE lines to $NOTIFY_SOCKET.

The socket is a filesystem path or, when it starts with '@', an abstract
socket (the '@' stands for the leading NUL byte). Without $NOTIFY_SOCKET (not
started by systemd as Type=notify) every call is a no-op.
"""
from __future__ import annotations

import os
import socket
import time

SEND_TIMEOUT = 2.0  # seconds a state change (READY, RELOADING, STOPPING) may wait for room

def _address(value: str) -> str | bytes:
    if value.startswith("@"):
        return b"\0" + os.fsencode(value[1:])
    return value


class Notifier:
    def __init__(self, socket_path: str | None = None):
        self.path = socket_path if socket_path is not None else os.environ.get("NOTIFY_SOCKET")
        self._sock = None

    @property
    def enabled(self) -> bool:
        return bool(self.path) and self.path[0] in "/@"

    def send(self, *assignments: str, wait: float = SEND_TIMEOUT) -> bool:
        """Send 'KEY=VALUE' lines in one datagram; False when there is no one to tell.

        A datagram socket blocks the sender while the receiver's queue is full (10
        datagrams by default), so a slow manager could stall the event loop: a send
        waits at most `wait` seconds (0: not at all) and is then given up.
        """
        if not self.enabled:
            return False
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        message = "\n".join(assignments).encode()
        try:
            self._sock.settimeout(wait if wait > 0 else 0.0)  # 0.0: non-blocking
            self._sock.sendto(message, _address(self.path))
        except OSError:
            return False  # full, or the manager went away: the daemon keeps working without it
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, status: str) -> bool:
        """Advisory and frequent: never waits (a later update carries the news)."""
        return self.send(f"STATUS={status}", wait=0)

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets Type=notify-reload tell this reload from an older one.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
