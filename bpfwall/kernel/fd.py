"""Fd: a file descriptor that closes itself; Object: a kernel object reached through one.

Every bpf(2) object (map, program, link, BTF) and every directory we act
relative to is reached through an fd; a leaked one keeps a kernel object
alive. An Fd is closed exactly once: by close() (idempotent), by leaving a
`with` block, or, as a safety net, when it is collected (with a
ResourceWarning, as Python's own files do: a leak is still a bug). release()
hands the number over instead, for a caller that keeps it as a plain int.

Fd.borrow(n) wraps a number someone else owns and will close: closing the
borrowed Fd only forgets the number.

Object is the base of maps.Map and progs.Program: an Fd and the object's info,
read once.
"""
from __future__ import annotations

import os
import warnings


class Fd:
    __slots__ = ("_n", "_owned")

    def __init__(self, n: int):
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"not a file descriptor: {n!r}")
        self._n, self._owned = n, True

    @classmethod
    def borrow(cls, n: int) -> "Fd":
        """A view of `n` that never closes it (its owner does)."""
        fd = cls(n)
        fd._owned = False
        return fd

    @property
    def closed(self) -> bool:
        return self._n < 0

    @property
    def owned(self) -> bool:
        return self._owned

    def fileno(self) -> int:
        if self._n < 0:
            raise ValueError("the fd is closed")
        return self._n

    def close(self) -> None:
        n, self._n = self._n, -1
        if n >= 0 and self._owned:
            os.close(n)

    def release(self) -> int:
        """The number, no longer ours: the caller closes it."""
        n = self.fileno()
        self._n = -1
        return n

    def dup(self) -> "Fd":
        """A second fd (close-on-exec) for the same open file, owned by the new Fd."""
        return Fd(os.dup(self.fileno()))

    def __enter__(self) -> "Fd":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_n", -1) >= 0 and self._owned:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, source=self, stacklevel=2)
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self._n < 0 else str(self._n)
        return f"<Fd {state}{'' if self._owned else ' borrowed'}>"


class Object:
    """A kernel object reached through an fd (a map, a program), its info read once: owns the
    fd when given an Fd, borrows it when given an int (its owner closes it)."""

    def __init__(self, fd: Fd | int, info=None):
        self.fd = fd if isinstance(fd, Fd) else Fd.borrow(fd)
        self._info = info

    def _read_info(self):
        raise NotImplementedError

    @property
    def info(self):
        if self._info is None:
            self._info = self._read_info()
        return self._info

    def fileno(self) -> int:
        return self.fd.fileno()

    def close(self) -> None:
        self.fd.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        name = self._info.name if self._info else "?"
        return f"<{type(self).__name__} {name!r} {self.fd!r}>"
