"""Every reader sees every drop event, though each source has one consumer.

A unit's BPF ring buffer has one consumer position and an nflog group one listener, so two
readers (two `bpfwall monitor`s, monitor beside the watcher's journal forwarding) would each
get a share. Instead the first reader of a source *owns* it: it reads the source and sends
every record to the others, which *subscribe* over a unix socket; when the owner leaves, a
subscriber takes over, and reads on from where it stopped (the ring keeps its records).

Rendezvous: `<state dir>/events/<name>.sock` (state dir: $BPFWALL_STATE_DIR, /run/bpfwall),
a SOCK_SEQPACKET socket the owner listens on. The directory is root's and 0700 (safefs
PrivateDir), so only root can connect to a source or offer one; each side also checks the
other's SO_PEERCRED (root, or our own uid). Who owns what is decided under the directory's
`.lock` (flock, held for microseconds): a joiner connects, or, when nobody listens (ENOENT,
ECONNREFUSED: a stale socket of an owner that died), unlinks the path and listens itself;
so at most one owner listens per name.

An owner never waits for a subscriber: each one's records queue in user space up to
QUEUE_BYTES, past that they are dropped and counted, and the count is sent to it (a lost
notice), so a slow reader loses its own events, counted, never another's. Messages: b"R" +
records (u32 length + bytes each); b"L" + JSON {key: n} of records dropped for this
subscriber; b"B" + u32: the owner leaves, with that many subscribers (the first to take over
waits up to TAKEOVER_WAIT for the others before reading the source, so none misses a record).
"""
from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import os
import select
import socket
import struct
import time

from .errors import Error
from .kernel.safefs import PrivateDir

QUEUE_BYTES = 4 << 20    # per subscriber, then its records are dropped (counted)
BATCH_BYTES = 60 << 10   # records per message, at most
TAKEOVER_WAIT = 0.5      # seconds a new owner waits for the old owner's other subscribers
_LEN = struct.Struct("=I")
_CRED = struct.Struct("=iII")  # struct ucred: pid, uid, gid


class FanoutError(Error):
    """The events directory cannot be used; one line naming it."""


def events_dir(state_dir: str | None = None) -> PrivateDir:
    from .runrecord import state_dir as default

    top = PrivateDir(state_dir or default(), "the state directory", FanoutError)
    try:
        return top.sub("events", create=True)
    finally:
        top.close()


def encode(records: list[bytes]) -> list[bytes]:
    """Records as b"R" messages of at most BATCH_BYTES each."""
    out, part, size = [], [], 1
    for r in records:
        if part and size + 4 + len(r) > BATCH_BYTES:
            out.append(b"R" + b"".join(part))
            part, size = [], 1
        part.append(_LEN.pack(len(r)) + r)
        size += 4 + len(r)
    if part:
        out.append(b"R" + b"".join(part))
    return out


def decode(msg: bytes) -> list[bytes]:
    out, at = [], 1
    while at + 4 <= len(msg):
        (n,) = _LEN.unpack_from(msg, at)
        out.append(msg[at + 4:at + 4 + n])
        at += 4 + n
    return out


def _trusted_peer(sock: socket.socket) -> bool:
    _, uid, _ = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    return uid in (0, os.geteuid())


class _Subscriber:
    """A subscriber as its owner sees it: what waits to be sent, what was dropped for it."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.queue: collections.deque[bytes] = collections.deque()
        self.queued = 0
        self.dropped: collections.Counter = collections.Counter()

    def offer(self, messages: list[bytes], records: list[bytes], key) -> None:
        size = sum(map(len, messages))
        if self.queued + size > QUEUE_BYTES:
            self.dropped.update(key(r) for r in records)
            return
        self.queue.extend(messages)
        self.queued += size

    def flush(self) -> bool:
        """Send what the socket takes now; False when the subscriber is gone."""
        if self.dropped:
            self.queue.append(b"L" + json.dumps(dict(self.dropped)).encode())
            self.queued += len(self.queue[-1])
            self.dropped.clear()
        try:
            while self.queue:
                self.sock.send(self.queue[0], socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
                self.queued -= len(self.queue.popleft())
        except BlockingIOError:
            pass
        except OSError:
            return False
        return True


class Channel:
    """One named source as this process reads it: as its owner or a subscriber.

    `opener()` opens the source (an object with fileno(), drain() → list of records as bytes,
    close()); `key(record)` names what a dropped record is counted under (a direction).
    `linger`: (seconds, period): after records came, the owner drains the source every period
    for that long without waiting to be woken (the bpf program wakes its reader at most every
    10 ms)."""

    def __init__(self, directory: PrivateDir, lock_fd: int, name: str, opener, key,
                 linger: tuple[float, float] | None = None):
        self.dir, self.lock_fd, self.name = directory, lock_fd, name
        self.opener, self.key, self.linger = opener, key, linger
        self.source = self.listener = self.upstream = None
        self.subscribers: dict[int, _Subscriber] = {}
        self.dropped: collections.Counter = collections.Counter()  # dropped for us by an owner
        self.last_record = self.last_pump = 0.0
        self.hold_until = 0.0  # a new owner waits for the old one's subscribers until then
        self.expected = 0
        self.join()

    @property
    def owner(self) -> bool:
        return self.source is not None

    def _path(self) -> str:
        return f"/proc/self/fd/{self.dir.fileno()}/{self.name}.sock"  # short, whatever the dir's path

    def join(self, expected: int = 0) -> None:
        """Subscribe to the owner, or become it (`expected`: subscribers of a departed owner)."""
        while True:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX)
            try:
                if self._connect() or self._own(expected):
                    return
            except _Busy:
                pass
            finally:
                fcntl.flock(self.lock_fd, fcntl.LOCK_UN)
            time.sleep(0.01)  # an owner is there but its backlog is full: try again

    def _connect(self) -> bool:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            sock.connect(self._path())
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            return False
        except BlockingIOError:
            sock.close()
            raise _Busy() from None
        except BaseException:
            sock.close()
            raise
        if not _trusted_peer(sock):
            sock.close()
            raise FanoutError(f"{self.dir.path}/{self.name}.sock: its owner is not root; not read")
        self.upstream = sock
        return True

    def _own(self, expected: int) -> bool:
        """Listen as the owner (nobody does; a dead owner's socket may be left)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{self.name}.sock", dir_fd=self.dir.fileno())  # a dead owner's
        source = self.opener()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            sock.bind(self._path())
            sock.listen(64)
        except BaseException:
            sock.close()
            source.close()
            raise
        self.source, self.listener = source, sock
        self.expected = expected
        self.hold_until = time.monotonic() + TAKEOVER_WAIT if expected else 0.0
        return True

    # -- what the reader's poll loop calls ------------------------------------------------------

    def fds(self) -> list[int]:
        if self.owner:
            return [self.source.fileno(), self.listener.fileno()]
        return [self.upstream.fileno()]

    def timeout(self, now: float) -> float | None:
        """Seconds until this channel wants to be pumped without an fd ready (None: never)."""
        if not self.owner:
            return None
        if self.hold_until:
            return max(0.0, self.hold_until - now)
        if any(s.queue or s.dropped for s in self.subscribers.values()):
            period = 0.01  # a subscriber's socket was full: try again soon
        elif self.linger and now - self.last_record < self.linger[0]:
            period = self.linger[1]
        else:
            return None
        return max(0.0, self.last_pump + period - now)

    def busy(self, now: float) -> bool:
        """Worth a pump at every wake-up: holding, sending, or lingering after records."""
        return self.owner and bool(self.hold_until and now >= self.hold_until or
                                   any(s.queue or s.dropped for s in self.subscribers.values()) or
                                   self.linger and now - self.last_record < self.linger[0])

    def pump(self, accept: bool = False) -> list[bytes]:
        """Everything that can be done now without waiting (`accept`: the listener is readable);
        the records for this process."""
        if not self.owner:
            return self._receive()
        self.last_pump = time.monotonic()
        if accept:
            self._accept()
        records = []
        if self.hold_until and (time.monotonic() >= self.hold_until or len(self.subscribers) >= self.expected):
            self.hold_until = 0.0
        if not self.hold_until:
            records = self.source.drain()
        if records:
            self.last_record = time.monotonic()
            messages = encode(records)
            for sub in self.subscribers.values():
                sub.offer(messages, records, self.key)
        for fd, sub in list(self.subscribers.items()):
            if not sub.flush():
                self._forget(fd)
        return records

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            if not _trusted_peer(sock):
                sock.close()
                continue
            sock.setblocking(False)
            self.subscribers[sock.fileno()] = _Subscriber(sock)
            # A subscriber sends nothing: readable means it left (EOF), seen by the hub's poll.
            self.on_new_fd(sock.fileno())

    def on_new_fd(self, fd: int) -> None:  # set by the Hub
        pass

    def on_gone_fd(self, fd: int) -> None:  # set by the Hub
        pass

    def subscriber_readable(self, fd: int) -> None:
        sub = self.subscribers.get(fd)
        if sub is None:
            return
        try:
            gone = sub.sock.recv(1, socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            gone = False
        except OSError:
            gone = True
        if gone:
            self._forget(fd)

    def _forget(self, fd: int) -> None:
        sub = self.subscribers.pop(fd)
        self.on_gone_fd(fd)
        sub.sock.close()

    def _receive(self) -> list[bytes]:
        records = []
        while True:
            try:
                msg = self.upstream.recv(BATCH_BYTES + 64, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return records
            except OSError:
                msg = b""
            if msg[:1] == b"R":
                records += decode(msg)
            elif msg[:1] == b"L":
                self.dropped.update(json.loads(msg[1:]))
            else:  # the owner left (b"B" + its subscribers, or EOF): take over, or follow the next
                expected = _LEN.unpack_from(msg, 1)[0] - 1 if msg[:1] == b"B" and len(msg) >= 5 else 0
                self.on_gone_fd(self.upstream.fileno())
                self.upstream.close()
                self.upstream = None
                self.join(max(expected, 0))
                for fd in self.fds():
                    self.on_new_fd(fd)
                return records + (self.pump() if self.owner else [])

    def close(self, flush_for: float = 1.0) -> None:
        """Leave: an owner sends what is queued (waiting up to `flush_for` seconds) and tells
        its subscribers, so that one takes over."""
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None
        if not self.owner:
            return
        self.pump(accept=True)
        deadline = time.monotonic() + flush_for
        bye = b"B" + _LEN.pack(len(self.subscribers))
        for sub in self.subscribers.values():
            sub.queue.append(bye)
        while any(s.queue for s in self.subscribers.values()) and time.monotonic() < deadline:
            for fd, sub in list(self.subscribers.items()):
                if not sub.flush():
                    self.subscribers.pop(fd).sock.close()
            select.select([], [s.sock for s in self.subscribers.values() if s.queue], [], 0.05)
        fcntl.flock(self.lock_fd, fcntl.LOCK_EX)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self.name}.sock", dir_fd=self.dir.fileno())
            self.listener.close()
        finally:
            fcntl.flock(self.lock_fd, fcntl.LOCK_UN)
        for sub in self.subscribers.values():
            sub.sock.close()
        self.subscribers.clear()
        self.source.close()
        self.source = self.listener = None


class _Busy(FanoutError):
    """The owner's listen backlog is full (connect: EAGAIN): it lives; try again shortly."""


class Hub:
    """The channels of one reader, on one epoll (its fileno() is the reader's)."""

    def __init__(self, state_dir: str | None = None):
        self.dir = events_dir(state_dir)
        try:
            self.lock_fd = self.dir.open_lock(".lock")
        except BaseException:
            self.dir.close()
            raise
        self.epoll = select.epoll()
        self.by_fd: dict[int, Channel] = {}
        self.channels: set[Channel] = set()

    def join(self, name: str, opener, key, linger=None) -> Channel:
        ch = Channel(self.dir, self.lock_fd, name, opener, key, linger)
        ch.on_new_fd = lambda fd, ch=ch: self._watch(fd, ch)
        ch.on_gone_fd = self._unwatch
        for fd in ch.fds():
            self._watch(fd, ch)
        self.channels.add(ch)
        return ch

    def _watch(self, fd: int, ch: Channel) -> None:
        self.by_fd[fd] = ch
        self.epoll.register(fd, select.EPOLLIN)

    def _unwatch(self, fd: int) -> None:
        self.by_fd.pop(fd, None)
        with contextlib.suppress(OSError, ValueError):
            self.epoll.unregister(fd)

    def leave(self, ch: Channel) -> None:
        for fd in [fd for fd, c in self.by_fd.items() if c is ch]:
            self._unwatch(fd)
        self.channels.discard(ch)
        ch.close()

    def fileno(self) -> int:
        return self.epoll.fileno()

    def timeout(self) -> float | None:
        now = time.monotonic()
        waits = [t for ch in self.channels if (t := ch.timeout(now)) is not None]
        return min(waits) if waits else None

    def poll(self, timeout: float | None) -> list[tuple[Channel, list[bytes]]]:
        """Wait up to `timeout` seconds (None: forever, or less when a channel wants it) for
        records; what came, per channel."""
        own = self.timeout()
        wait = own if timeout is None else timeout if own is None else min(own, timeout)
        ready = self.epoll.poll(-1 if wait is None else max(wait, 0))
        due, accepting = set(), set()
        for fd, _ in ready:
            ch = self.by_fd.get(fd)
            if ch is None:
                continue
            if ch.owner and fd in ch.subscribers:
                ch.subscriber_readable(fd)
            else:
                due.add(ch)
                if ch.owner and fd == ch.listener.fileno():
                    accepting.add(ch)
        now = time.monotonic()
        due |= {ch for ch in self.channels if ch.busy(now)}
        return [(ch, records) for ch in due if (records := ch.pump(ch in accepting))]

    def close(self) -> None:
        for ch in list(self.channels):
            self.leave(ch)
        self.epoll.close()
        os.close(self.lock_fd)
        self.dir.close()
