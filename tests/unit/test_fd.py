"""Fd: closed exactly once, by whoever owns it (no root needed: pipes stand in for BPF objects)."""
from __future__ import annotations

import errno
import gc
import os

import pytest

from bpfwall.kernel.fd import Fd


def is_open(n: int) -> bool:
    try:
        os.fstat(n)
    except OSError as e:
        assert e.errno == errno.EBADF
        return False
    return True


@pytest.fixture
def pipe():
    r, w = os.pipe()
    yield r, w
    for n in (r, w):
        if is_open(n):
            os.close(n)


def test_with_block_closes_and_close_is_idempotent(pipe):
    r, _ = pipe
    with Fd(r) as fd:
        assert fd.fileno() == r and not fd.closed
    assert not is_open(r) and fd.closed
    fd.close()  # again: nothing (r may be reused by now; it must not be closed twice)
    with pytest.raises(ValueError):
        fd.fileno()


def test_second_close_does_not_close_a_reused_number(pipe):
    r, _ = pipe
    fd = Fd(r)
    fd.close()
    reused = os.open("/dev/null", os.O_RDONLY)
    try:
        assert reused == r  # the lowest free number
        fd.close()
        assert is_open(reused)
    finally:
        os.close(reused)


def test_release_hands_the_number_over(pipe):
    r, _ = pipe
    fd = Fd(r)
    assert fd.release() == r
    del fd
    gc.collect()
    assert is_open(r)
    os.close(r)


def test_borrowed_fd_is_never_closed(pipe):
    r, _ = pipe
    with Fd.borrow(r) as fd:
        assert not fd.owned
    assert fd.closed and is_open(r)
    del fd
    gc.collect()
    assert is_open(r)


def test_a_forgotten_fd_is_closed_when_collected_with_a_warning(pipe):
    r, _ = pipe
    fd = Fd(r)
    with pytest.warns(ResourceWarning, match="unclosed"):
        del fd
        gc.collect()
    assert not is_open(r)


def test_dup_is_owned_separately(pipe):
    r, w = pipe
    with Fd(w) as fd, fd.dup() as copy:
        assert copy.fileno() != w
        fd.close()
        os.write(copy.fileno(), b"x")  # still open
    assert os.read(r, 1) == b"x"


@pytest.mark.parametrize("bad", [-1, "3", None])
def test_not_a_number_is_refused(bad):
    with pytest.raises(ValueError):
        Fd(bad)
