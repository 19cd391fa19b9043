"""A process born inside a cgroup (clone3 CLONE_INTO_CGROUP: it never runs outside it) that
floods UDP to some ports from its first instant until told to stop, and reports per port how
many datagrams it sent and how many the kernel refused (EPERM: dropped on egress)."""
from __future__ import annotations

import os
import select
import socket
import struct

from bpfwall.sandbox import clone_into

REPORT = struct.Struct("=QQ")  # per port: sent, refused


class Flood:
    _held: set[int] = set()  # the parent's ends of every flood's pipes: a new child closes them all

    def __init__(self, path: str, ports: list[int]):
        self.ports = ports
        self._stop_r, self._stop_w = os.pipe()
        self._rep_r, rep_w = os.pipe()
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self.pid = clone_into(fd)
        finally:
            os.close(fd)
        if self.pid == 0:  # the child: never returns
            code = 1
            try:
                # the parent's ends: else its close would never read as the end here (or there)
                for fd in (self._rep_r, self._stop_w, *Flood._held):
                    os.close(fd)
                self._send(rep_w)
                code = 0
            finally:
                os._exit(code)
        os.close(rep_w)
        os.close(self._stop_r)
        Flood._held |= {self._stop_w, self._rep_r}

    def _send(self, report: int) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        counts = [[0, 0] for _ in self.ports]
        poller = select.poll()
        poller.register(self._stop_r, select.POLLIN)
        n = 0
        while True:
            for i, port in enumerate(self.ports):
                counts[i][0] += 1
                try:
                    s.sendto(b"flood", ("127.0.0.1", port))
                except PermissionError:
                    counts[i][1] += 1
            n += 1
            if n % 64 == 0 and poller.poll(0):
                break
        os.write(report, b"".join(REPORT.pack(*c) for c in counts))

    def stop(self) -> list[tuple[int, int]]:
        """Stop it; [(sent, refused)] per port."""
        os.close(self._stop_w)
        Flood._held -= {self._stop_w, self._rep_r}
        data = b""
        while len(data) < REPORT.size * len(self.ports):
            chunk = os.read(self._rep_r, 4096)
            if not chunk:
                break
            data += chunk
        os.close(self._rep_r)
        status = os.waitpid(self.pid, 0)[1]
        assert os.waitstatus_to_exitcode(status) == 0 and len(data) == REPORT.size * len(self.ports), \
            "the flooding process failed"
        return [REPORT.unpack_from(data, i * REPORT.size) for i in range(len(self.ports))]
