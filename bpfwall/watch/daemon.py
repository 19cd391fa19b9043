"""`bpfwall watch`: keep the policy's programs attached to every matching cgroup.

Start: load the policy, pin each entry's programs (reusing unchanged ones),
then reconcile: walk the cgroup tree under the root, watching every directory
with inotify, attaching where the policy matches and detaching our programs
where it no longer does. Then wait in poll(2) on the inotify fd and on a pipe
the signal handlers write to (signal.set_wakeup_fd): a new cgroup is attached
as soon as its IN_CREATE is read; SIGHUP re-reads the policy; SIGTERM/SIGINT
stop the watcher and leave every filter attached and pinned, still enforced.

Cgroup paths given to the policy are relative to the watched root (the whole
cgroup2 mount by default), e.g. "system.slice/nginx.service".
"""
from __future__ import annotations

import os
import select
import signal

from ..backends.bpf import BackendError
from ..kernel.errors import KernelError
from . import inotify as ino
from .log import DEBUG, INFO, Log
from .notify import Notifier
from .state import Owned, State, WatchError
from .units import BpfUnits, UnitHandle, is_gone

# cgroupfs (kernfs) sends no IN_DELETE_SELF on rmdir, and a watch pins the removed
# directory's inode, so removals are taken from the parent's IN_DELETE and the
# child's watch is dropped by hand. No IN_MOVED_*: cgroup2 refuses rename(2) (EPERM).
WATCH_MASK = ino.IN_CREATE | ino.IN_DELETE | ino.IN_ONLYDIR | ino.IN_DELETE_SELF
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def load_policy_checked(policy_dir: str | None):
    """The policy, refused as a whole if any entry cannot be served."""
    from ..policy import load_policy

    policy = load_policy(directory=policy_dir)
    for entry in policy.entries:
        if entry.backend == "nft":
            try:
                from ..backends import nft  # noqa: F401  (written by another part of the project)
            except ImportError:
                raise WatchError(f"{entry.where}: {entry.name}: the nft backend is not available") from None
            raise WatchError(f"{entry.where}: {entry.name}: bpfwall watch serves backend \"bpf\" "
                             "entries only so far")
    return policy


class Watcher:
    def __init__(self, policy_dir: str | None, pin_root: str, cgroup_root: str, state_dir: str,
                 log: Log, notifier: Notifier | None = None, cache=None):
        self.policy_dir = policy_dir
        self.root = cgroup_root
        self.log = log
        self.notifier = notifier or Notifier(None)
        self.backend = BpfUnits(pin_root, cache)
        self.state = State(state_dir, pin_root)
        self.policy = None
        self.units: dict[str, UnitHandle] = {}  # entry name → open programs
        self.owner: dict[int, tuple[str, str]] = {}  # program id → (entry name, direction)
        self.watches: dict[int, str] = {}  # inotify wd → cgroup path
        self.wd_of: dict[str, int] = {}    # cgroup path → inotify wd
        self.attached: dict[str, str] = {}  # cgroup path → entry name whose programs it carries
        self.inotify: ino.Inotify | None = None
        self._sent_status = None
        self._signals: tuple[int, int, dict, int] | None = None  # pipe fds, previous handlers, wakeup fd

    # -- helpers --------------------------------------------------------------

    def rel(self, path: str) -> str:
        return os.path.relpath(path, self.root) if path != self.root else ""

    def _index_programs(self) -> None:
        self.owner = {pid: (name, d) for name, h in self.units.items() for d, pid in h.ids.items()}

    @property
    def status(self) -> str:
        return f"policing {len(self.units)} units on {len(self.attached)} cgroups"

    def update_status(self) -> None:
        status = self.status
        if status != self._sent_status and self.notifier.status(status):
            self._sent_status = status  # sent; an update that found no room is retried next time

    # -- units ----------------------------------------------------------------

    def apply_policy(self, policy) -> None:
        """Pin every entry's programs (compiling all first), unload entries that left."""
        for entry in policy.entries:
            self.backend.prepare(entry)  # a build error stops here, before any change
        for entry in policy.entries:
            old = self.units.get(entry.name)
            if old is not None and old.fingerprint == entry.fingerprint():
                continue
            try:
                handle, how = self.backend.ensure(entry, self.state.units.get(entry.name))
            except Exception as e:  # noqa: BLE001 — kernel, backend or build: the entry keeps what it had
                if self.policy is None:
                    raise  # at start, a unit that cannot be loaded stops the watcher
                self.log.error("load", f"{entry.name}: {e}; keeping its previous programs",
                               unit=entry.name, file=entry.where)
                continue
            if old is not None:
                old.close()
            self.units[entry.name] = handle
            self.state.units[entry.name] = Owned(handle.fingerprint, self.backend.backend, dict(handle.ids))
            self.state.write()
            self.log.event("load", f"{entry.name}: {how} ({', '.join(handle.progs) or 'no programs'})",
                           DEBUG if how == "reused" else INFO,
                           unit=entry.name, direction=",".join(handle.progs), file=entry.where)
        self.policy = policy
        self._index_programs()

    def unload_removed(self) -> None:
        """Units we loaded that the policy no longer names: detach everywhere, unpin."""
        wanted = {e.name for e in self.policy.entries}
        for name in [n for n in self.state.units if n not in wanted]:
            handle = self.units.pop(name, None)
            try:
                detached = self.backend.unload(name)
            except (KernelError, BackendError) as e:
                self.log.error("unload", f"{name}: {e}", unit=name)
                if handle is not None:
                    self.units[name] = handle
                continue
            if handle is not None:
                handle.close()
            del self.state.units[name]
            self.state.write()
            for cg, direction in detached:
                self.attached.pop(cg, None)
            self.log.info("unload", f"{name}: left the policy; detached from {len(detached)} attachment(s), unpinned",
                          unit=name)
        self._index_programs()

    # -- cgroups --------------------------------------------------------------

    def _watch(self, path: str) -> int | None:
        if self.inotify is None:
            return 0
        wd = self.inotify.add(path, WATCH_MASK)
        if wd is not None:
            self.watches[wd] = path
            self.wd_of[path] = wd
        return wd

    def forget(self, path: str) -> None:
        """A removed cgroup: drop its watch and its index entry."""
        wd = self.wd_of.pop(path, None)
        if wd is not None:
            self.watches.pop(wd, None)
            self.inotify.remove(wd)
        name = self.attached.pop(path, None)
        self.log.debug("gone", f"{path} removed", cgroup=path, entry=name)

    def sync_cgroup(self, path: str, fresh: bool) -> None:
        """Make the cgroup carry exactly its matching entry's programs (of ours).

        A fresh cgroup (just created) cannot carry ours yet, so it skips the query.
        """
        entry = self.policy.match(self.rel(path)) if path != self.root else None
        handle = self.units.get(entry.name) if entry is not None else None
        try:
            if handle is not None:
                new = handle.attach(path)
                self.attached[path] = handle.name
                if new:
                    self.log.info("attach", f"{handle.name} → {path} ({', '.join(new)})",
                                  unit=os.path.basename(path), cgroup=path, direction=",".join(new),
                                  entry=handle.name)
            if not fresh:
                self._detach_stale(path, handle)
        except KernelError as e:
            if is_gone(e) or not os.path.isdir(path):
                self.log.debug("vanished", f"{path} went away before it was handled", cgroup=path)
                self.attached.pop(path, None)
                return
            self.log.error("attach", str(e), unit=os.path.basename(path), cgroup=path,
                           entry=entry.name if entry is not None else None)

    def _detach_stale(self, path: str, keep: UnitHandle | None) -> None:
        from ..kernel import cgroup

        for direction in ("ingress", "egress"):
            _, ids = cgroup.query(path, direction)
            for pid in ids:
                name, d = self.owner.get(pid, (None, None))
                if name is None or (keep is not None and keep.name == name):
                    continue
                if self.units[name].detach(path, [d]):
                    self.log.info("detach", f"{name} ✕ {path} ({d}): no longer matches",
                                  unit=os.path.basename(path), cgroup=path, direction=d, entry=name)
        if keep is None:
            self.attached.pop(path, None)

    def scan(self, top: str, fresh: bool) -> set[str]:
        """Watch and sync `top` and everything below it; the paths seen.

        Each directory is watched before its children are listed, so a child made
        meanwhile shows up either in the listing or as an event (or both: harmless).
        """
        seen: set[str] = set()
        stack = [top]
        while stack:
            path = stack.pop()
            try:
                wd = self._watch(path)
            except ino.InotifyError as e:
                self.log.error("watch", f"{e}; cgroups created below it are not seen until a rescan",
                               cgroup=path)
                wd = -1
            if wd is None:
                self.log.debug("vanished", f"{path} went away before it was watched", cgroup=path)
                continue
            seen.add(path)
            self.sync_cgroup(path, fresh)
            try:
                with os.scandir(path) as it:
                    stack.extend(e.path for e in it if e.is_dir(follow_symlinks=False))
            except (FileNotFoundError, NotADirectoryError):
                continue
        return seen

    def reconcile(self) -> None:
        """Everything under the root, from scratch: attach, detach, rebuild the index."""
        old = self.watches
        self.watches, self.wd_of = {}, {}
        seen = self.scan(self.root, fresh=False)
        for path in [p for p in self.attached if p not in seen]:
            del self.attached[path]
        if self.inotify is not None:
            for wd in set(old) - set(self.watches):
                self.inotify.remove(wd)
        self.update_status()

    # -- events ---------------------------------------------------------------

    def handle(self, events: list[ino.Event]) -> None:
        full = False
        for ev in events:
            if ev.mask & ino.IN_Q_OVERFLOW:
                full = True  # events were lost: look at everything
            elif ev.mask & ino.IN_CREATE and ev.mask & ino.IN_ISDIR:
                parent = self.watches.get(ev.wd)
                if parent is not None:
                    self.scan(os.path.join(parent, ev.name), fresh=True)
            elif ev.mask & ino.IN_DELETE and ev.mask & ino.IN_ISDIR:
                parent = self.watches.get(ev.wd)
                if parent is not None:
                    self.forget(os.path.join(parent, ev.name))
            elif ev.mask & (ino.IN_DELETE_SELF | ino.IN_IGNORED):
                path = self.watches.pop(ev.wd, None)  # the watched directory itself is gone
                if path is not None and self.wd_of.get(path) == ev.wd:
                    del self.wd_of[path]
                    self.attached.pop(path, None)
        if full:
            self.log.warning("reconcile", "inotify queue overflowed: full rescan")
            self.reconcile()
        self.update_status()

    def reload(self) -> None:
        self.notifier.reloading()
        try:
            policy = load_policy_checked(self.policy_dir)
            self.apply_policy(policy)
        except Exception as e:  # noqa: BLE001 — any reason to refuse keeps the old policy running
            self.log.warning("reload", f"{e}; keeping the running policy")
            self.notifier.ready(self.status)
            return
        self.reconcile()
        self.unload_removed()
        self.update_status()
        self.log.info("reload", f"policy reloaded: {self.status}")
        self.notifier.ready(self.status)

    # -- life cycle -----------------------------------------------------------

    def start(self, once: bool = False) -> None:
        policy = load_policy_checked(self.policy_dir)  # invalid: nothing has changed yet
        self.state.lock()
        self.state.read()
        if not once:
            try:
                self.inotify = ino.Inotify()
            except ino.InotifyError as e:
                raise WatchError(str(e)) from None
            self._catch_signals()  # from here on a SIGHUP or SIGTERM waits for the loop
        self.apply_policy(policy)
        self.reconcile()
        self.unload_removed()
        self.update_status()
        self.log.info("start", f"{self.status} under {self.root}")

    def _catch_signals(self) -> None:
        """Signals become bytes on a pipe (signal.set_wakeup_fd), read by the poll loop."""
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        previous = {s: signal.signal(s, _note) for s in (signal.SIGHUP, *STOP_SIGNALS)}
        self._signals = (rfd, wfd, previous, signal.set_wakeup_fd(wfd, warn_on_full_buffer=False))

    def _release_signals(self) -> None:
        if self._signals is None:
            return
        rfd, wfd, previous, old_wakeup = self._signals
        signal.set_wakeup_fd(old_wakeup)
        for s, h in previous.items():
            signal.signal(s, h)
        os.close(rfd)
        os.close(wfd)
        self._signals = None

    def run(self) -> int:
        """The event loop; returns the exit status when a stop signal arrives."""
        rfd = self._signals[0]
        poller = select.poll()
        poller.register(self.inotify.fd, select.POLLIN)
        poller.register(rfd, select.POLLIN)
        self.notifier.ready(self.status)
        while True:
            for fd, _ in poller.poll():
                if fd == rfd:
                    for signum in _drain(rfd):
                        if signum in STOP_SIGNALS:
                            self.notifier.stopping()
                            self.log.info("stop", f"{signal.Signals(signum).name}: leaving every "
                                                  "filter attached and pinned")
                            return 0
                        if signum == signal.SIGHUP:
                            self.reload()
                else:
                    self.handle(self.inotify.read())

    def close(self) -> None:
        self._release_signals()
        for handle in self.units.values():
            handle.close()
        self.units.clear()
        if self.inotify is not None:
            self.inotify.close()
        self.state.unlock()
        self.notifier.close()


def _note(signum, frame) -> None:
    """The signal number reaches the loop through the wakeup fd; nothing to do here."""


def _drain(fd: int) -> list[int]:
    out = []
    while True:
        try:
            data = os.read(fd, 512)
        except BlockingIOError:
            return out
        if not data:
            return out
        out.extend(data)
