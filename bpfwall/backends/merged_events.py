"""The drop events of several backends as one EventSource (base.EventSource): what `monitor`
reads when no backend is chosen."""
from __future__ import annotations

import select
import time


class MergedEvents:
    def __init__(self, sources: list):
        self.sources = sources
        self._epoll = select.epoll()
        for s in sources:
            self._epoll.register(s.fileno(), select.EPOLLIN)

    def fileno(self) -> int:
        return self._epoll.fileno()

    def timeout(self) -> float | None:
        waits = [t for s in self.sources if (t := s.timeout()) is not None]
        return min(waits) if waits else None

    def read(self, timeout: float | None = None) -> list:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            out = [e for s in self.sources for e in s.read(0)]
            left = None if deadline is None else deadline - time.monotonic()
            if out or (left is not None and left <= 0):
                return out
            own = self.timeout()
            wait = own if left is None else left if own is None else min(own, left)
            self._epoll.poll(-1 if wait is None else max(wait, 0))

    def lost(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for s in self.sources:
            for k, n in s.lost().items():
                out[k] = out.get(k, 0) + n
        return out

    def close(self) -> None:
        for s in self.sources:
            s.close()
        self._epoll.close()

    def __enter__(self) -> "MergedEvents":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
