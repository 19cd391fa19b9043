"""Errors of the kernel layer: one line each, saying what failed and on what."""
from __future__ import annotations

import os
import re

from ..errors import Error


class KernelError(Error):
    """A bpf(2), bpffs or cgroup operation failed; `errno` is the kernel's answer."""

    def __init__(self, errno: int, message: str | None = None):
        self.errno = errno
        self.message = message if message is not None else os.strerror(errno)
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message

    def within(self, context: str) -> "KernelError":
        """The same error (same class, errno and attributes), its message prefixed by `context`."""
        err = type(self).__new__(type(self))
        err.__dict__.update(self.__dict__)
        err.message = f"{context}: {self.message}"
        err.args = (err.message,)
        return err


class VerifierError(KernelError):
    """The kernel's verifier refused a program (or the BTF verifier a BTF blob).

    `log` is the whole log; str(e) is `what`, the log's last meaningful line and,
    when the program carried line info, the source line the verifier stopped at.
    """

    def __init__(self, errno: int, what: str, log: str):
        self.log = log
        last = last_log_line(log) or os.strerror(errno)
        source = _SOURCE_LINE.findall(log)
        super().__init__(errno, f"{what}: {last}" + (f" (at {source[-1]})" if source else ""))


class NotBpffs(KernelError):
    """A pin path is not on a BPF filesystem (usually: /sys/fs/bpf is not mounted)."""


# "; <source text> @ <file>:<line>": the verifier quotes the source (from BTF line info).
_SOURCE_LINE = re.compile(r"^; .* @ (\S+:\d+)$", re.MULTILINE)

# Summary lines the verifier appends after the line that explains the failure.
_SUMMARY_PREFIXES = ("processed ", "verification time", "stack depth", "max_states_per_insn",
                     "-- END PROG LOAD LOG --")


def last_log_line(log: str) -> str:
    """The line of a verifier log that says why it failed: the last one that is not a summary."""
    for line in reversed(log.splitlines()):
        line = line.strip()
        if line and not line.startswith(_SUMMARY_PREFIXES):
            return line
    return ""
