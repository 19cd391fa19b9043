"""`bpfwall watch`: keep the policy's filters on every matching cgroup.

Start: load the policy, load each entry's filters (reusing unchanged ones)
through the backend the entry names (backends/base.py: bpf pins programs, nft
renders the unit into our nft table); the watcher never asks which it has.
Then reconcile: walk the cgroup tree under the root, watching every directory
with inotify, attaching where the policy matches and detaching our filters
where it no longer does. Then wait in poll(2) on the inotify fd, on a pipe the
signal handlers write to (signal.set_wakeup_fd) and on what a backend in use
asks to be polled (its guard: nft's listens to the ruleset's netlink events and
restores a flushed or deleted table): a new cgroup is attached as soon as its
IN_CREATE is read; SIGHUP re-reads the policy; SIGTERM/SIGINT stop the watcher
and leave every filter attached, still enforced.

Cgroup paths given to the policy are relative to the watched root (the whole
cgroup2 mount by default), e.g. "system.slice/nginx.service".
"""
from __future__ import annotations

import errno
import os
import select
import signal
import time
from concurrent.futures import ThreadPoolExecutor

from .. import backends
from ..backends.base import DIRECTIONS
from ..errors import Error
from ..kernel import cgroup
from ..kernel.errors import KernelError
from ..policy import judge
from . import inotify as ino, nesting
from .dropevents import DEFAULT_CAP, EventForwarder
from .log import DEBUG, ERROR, INFO, Log
from .notify import Notifier
from .state import State, WatchError

# cgroupfs (kernfs) sends no IN_DELETE_SELF on rmdir, and a watch pins the removed
# directory's inode, so removals are taken from the parent's IN_DELETE and the
# child's watch is dropped by hand. No IN_MOVED_*: cgroup2 refuses rename(2) (EPERM).
WATCH_MASK = ino.IN_CREATE | ino.IN_DELETE | ino.IN_ONLYDIR | ino.IN_DELETE_SELF
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# How often the bpf units' pins are checked for removal or replacement behind our back.
PIN_CHECK_INTERVAL = 2.0
# A removed cgroup's nft element is dropped once no cgroup event came for CLEANUP_IDLE seconds
# (at the latest CLEANUP_MAX after the removal): a restart removes a unit's cgroup and makes
# the new one at once, and the new one's attach must not wait behind the old one's cleanup.
# The element of a removed cgroup matches nothing meanwhile (cgroup ids are never reused).
CLEANUP_IDLE, CLEANUP_MAX = 0.02, 1.0
BACKEND_ERRORS = (Error,)  # what a backend raises: every layer's errors (bpfwall/errors.py)
# A state file the disk refused (full), and a cgroup whose sync failed (e.g. the nft worker timed
# out and was restarted), are tried again this often; the filters never wait for a record.
RETRY = 1.0
# While entries load side by side, what is loaded is written to the state at most this often
# (a write per entry cost 4 ms each at boot, more than the load itself).
RECORD_EVERY = 0.1


def is_gone(error: KernelError) -> bool:
    """A cgroup removed between the event and our attach: normal, not an error."""
    return error.errno == errno.ENOENT


def plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def status_line(entries, attached: dict[str, str]) -> str:
    """What `systemctl status bpfwall` shows, e.g. `policing 3 cgroups with 2 policy entries (1 of
    them matches no cgroup now)`: entries (a glob covers many units) and the cgroups (path → entry)
    the watcher attached them to."""
    entries = set(entries)
    if not entries:
        return "no policy entries"
    if not attached:
        return f"{plural(len(entries), 'policy entry', 'policy entries')} loaded, no cgroup of theirs exists now"
    idle = len(entries - set(attached.values()))
    text = f"policing {plural(len(attached), 'cgroup')} with {plural(len(entries), 'policy entry', 'policy entries')}"
    if idle:
        text += f" ({idle} of them {'matches' if idle == 1 else 'match'} no cgroup now)"
    return text


def load_policy_checked(policy_dir: str | None):
    """The policy, refused as a whole if it is invalid (only reads files)."""
    from ..policy import load_policy

    return load_policy(directory=policy_dir)


class Watcher:
    def __init__(self, policy_dir: str | None, pin_root: str, cgroup_root: str, state_dir: str,
                 log: Log, notifier: Notifier | None = None, cache=None, table: str | None = None,
                 drop_events: int | None = None, compiler: str | None = None):
        self.policy_dir = policy_dir
        self.root = cgroup_root
        self.log = log
        self.notifier = notifier or Notifier(None)
        # policy entries name theirs; `compiler` (the command line's) overrides the policy's
        self.backends = backends.every(pin_root=pin_root, table=table, cache=cache, compiler=compiler)
        self.state = State(state_dir, pin_root)
        self.policy = None
        self.units: dict = {}  # entry name → its backend's Handle (backends/base.py)
        self.watches: dict[int, str] = {}  # inotify wd → cgroup path
        self.wd_of: dict[str, int] = {}    # cgroup path → inotify wd
        self.attached: dict[str, str] = {}  # cgroup path → entry name whose filters it carries
        self.guarded: dict[str, str] = {}   # slice path → the slice default whose guard sits on it
        self.classified: dict[str, tuple[int, frozenset]] = {}  # path → (cgroup id, guards told about it)
        self.nesting: set[str] = set()   # unit entries built as guards (watch/nesting.py)
        self._to_nest: set[str] = set()  # found to need it since the last _nest()
        self.removed: dict[str, tuple[str, float]] = {}  # removed cgroup → (entry name, when): cleanup due
        self._last_event = 0.0
        self._next_pin_check = time.monotonic() + PIN_CHECK_INTERVAL
        self.inotify: ino.Inotify | None = None
        self.guards: dict = {}  # backend name → its guard, polled by the loop
        self._sent_status = None
        self._unrecorded: dict[str, str] = {}  # state file → why it could not be written (logged)
        self._resync: dict[str, str] = {}      # cgroup whose sync failed → the error (logged once)
        self._retry_at: float | None = None    # when to retry those (monotonic)
        self._signals: tuple[int, int, dict, int] | None = None  # pipe fds, previous handlers, wakeup fd
        self.reaction = None  # told the seconds from a new cgroup's IN_CREATE read to its attach (metrics)
        cap = DEFAULT_CAP if drop_events is None else drop_events
        self.events = EventForwarder(log, cap, state_dir) if cap > 0 else None  # drop events → the journal

    # -- helpers --------------------------------------------------------------

    def rel(self, path: str) -> str:
        return os.path.relpath(path, self.root) if path != self.root else ""

    @property
    def status(self) -> str:
        return status_line(self.units, self.attached)

    def update_status(self) -> None:
        status = self.status
        if status != self._sent_status and self.notifier.status(status):
            self._sent_status = status  # sent; an update that found no room is retried next time

    # -- units ----------------------------------------------------------------

    def _claim(self, policy, watching: bool) -> None:
        """Each backend the policy uses: checked that it runs here and claimed (its locks) before
        anything changes; its guard, if it has one, started."""
        for name in sorted({e.backend for e in policy.entries}):
            backend = self.backends[name]
            backend.claim(self.state)
            if watching and name not in self.guards:
                guard = backend.guard(self.log)
                if guard is not None:
                    self.guards[name] = guard
                    guard.check()  # e.g. a table removed while no watcher ran comes back before any change

    def apply_policy(self, policy) -> None:
        """Load every entry's filters (compiling/lowering all first); an entry that moved to the
        other backend (or nft table) retires its old filters, removed by unload_removed().
        Entries of a backend that allows it load side by side (at boot: 100 units, each mostly
        the verifier's work); their results are taken, logged and recorded in policy order."""
        for backend, adapter in self.backends.items():
            adapter.prepare_many([e for e in policy.entries if e.backend == backend])  # a build error stops here
        todo = []
        for entry in policy.entries:
            old = self.units.get(entry.name)
            if old is not None and old.fingerprint == entry.fingerprint():
                continue
            owned = self.state.units.get(entry.name)
            moved = owned is not None and (owned.backend != entry.backend
                                           or not self.backends[entry.backend].holds(owned))
            todo.append((entry, old, owned, moved))
        failed, unrecorded, recorded = None, False, time.monotonic()
        with ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0)), thread_name_prefix="bpfwall-load") as pool:
            running = [pool.submit(self.backends[e.backend].ensure, e, None if moved else owned)
                       if self.backends[e.backend].parallel else None for e, _, owned, moved in todo]
            for i, ((entry, old, owned, moved), future) in enumerate(zip(todo, running, strict=False)):
                adapter = self.backends[entry.backend]
                if failed is not None and (future is None or future.cancelled()):
                    continue  # not started: the watcher stops without it
                try:
                    handle, how = future.result() if future is not None \
                        else adapter.ensure(entry, None if moved else owned)
                except Exception as e:  # noqa: BLE001 — kernel, backend or build: the entry keeps what it had
                    if self.policy is None:  # at start, a unit that cannot be loaded stops the watcher
                        failed = failed or e
                        pool.shutdown(wait=False, cancel_futures=True)
                        continue  # those loaded meanwhile are still recorded
                    self.log.error("load", f"{entry.name}: {e}; keeping its previous filters",
                                   unit=entry.name, file=entry.where)
                    continue
                if old is not None:
                    old.close()
                if moved:
                    self.state.retired[entry.name] = owned
                self.units[entry.name] = handle
                self.state.units[entry.name] = adapter.owned(handle)
                unrecorded = True
                following = running[i + 1] if i + 1 < len(running) else None  # None: last, or not parallel
                if following is None or time.monotonic() >= recorded + RECORD_EVERY:
                    self.record()
                    unrecorded, recorded = False, time.monotonic()
                self.log.event("load", f"{entry.name}: {how} ({', '.join(handle.directions) or 'no filters'}, "
                                       f"{entry.backend})",
                               DEBUG if how == "reused" else INFO, unit=entry.name,
                               direction=",".join(handle.directions), file=entry.where, backend=entry.backend)
        if unrecorded:
            self.record()
        if failed is not None:
            raise failed
        self.policy = policy

    def _unload(self, name: str, owned, why: str) -> bool:
        """Remove a unit's filters from the backend that holds them; False on failure."""
        try:
            detached = self.backends[owned.backend].release(name, owned)
        except BACKEND_ERRORS as e:
            self.log.error("unload", f"{name}: {e}", unit=name, backend=owned.backend)
            return False
        for cg, _direction in detached:
            if self.attached.get(cg) == name and name not in self.units:
                del self.attached[cg]
        self.log.info("unload", f"{name}: {why}; removed from {len(detached)} attachment(s) ({owned.backend})",
                      unit=name, backend=owned.backend)
        return True

    def unload_removed(self) -> None:
        """Units we loaded that the policy no longer names, and filters an entry left behind
        when it moved to another backend: detach everywhere, unload."""
        for name, owned in list(self.state.retired.items()):
            now = self.state.units.get(name)
            where = "elsewhere" if now is None else f"to {self.backends[now.backend].where(now)}"
            if self._unload(name, owned, f"moved {where}"):
                del self.state.retired[name]
                self.record()
        wanted = {e.name for e in self.policy.entries}
        for name in [n for n in self.state.units if n not in wanted]:
            handle = self.units.pop(name, None)
            if not self._unload(name, self.state.units[name], "left the policy"):
                if handle is not None:
                    self.units[name] = handle
                continue
            if handle is not None:
                handle.close()
            del self.state.units[name]
            self.record()

    # -- records --------------------------------------------------------------

    def record(self) -> None:
        """Write the watcher state after a change the kernel has made already. A failure (a full
        disk) is logged and retried: it must never stop the watcher, whose filters are in place."""
        try:
            self.state.write()
        except WatchError:
            pass  # state.unsaved says why; check_records logs it
        self.check_records()

    def check_records(self) -> None:
        """Log each state file that cannot be written (once per reason) and each written again;
        schedule the retry; reconcile when a waiting record (nft: the table's state) was replaced
        by another writer."""
        failing = {path: why for backend in self.backends.values() for path, why in backend.unrecorded().items()}
        if self.state.unsaved is not None:
            failing[self.state.path] = self.state.unsaved
        for path, why in failing.items():
            if self._unrecorded.get(path) != why:
                self.log.error("record", f"{why}; the filters are in place and stay so, writing it is "
                                         f"retried every {RETRY:g} s", file=path)
        for path in set(self._unrecorded) - set(failing):
            self.log.info("record", f"{path} is written again", file=path)
        self._unrecorded = failing
        self._schedule_retry()
        lost = [path for backend in self.backends.values() for path in backend.lost_records()]
        if lost and self.policy is not None:
            self.log.warning("record", f"{', '.join(lost)} was written by another process before the changes "
                                       "waiting for it: reconciling", file=lost[0])
            self.reconcile()

    def _schedule_retry(self) -> None:
        if not self._unrecorded and not self._resync:
            self._retry_at = None
        elif self._retry_at is None:
            self._retry_at = time.monotonic() + RETRY

    def retry(self) -> None:
        """Sync the cgroups whose sync failed again, and write the state files the disk refused."""
        self._retry_at = None
        for path in sorted(self._resync):
            if os.path.isdir(path):
                self.sync_cgroup(path, fresh=False)
            else:
                self._resync.pop(path)
        self.retry_records()

    def retry_records(self) -> None:
        if self.state.unsaved is not None:
            try:
                self.state.write()
            except WatchError:
                pass
        for backend in self.backends.values():
            try:
                backend.retry_records()
            except Error as e:
                self.log.error("record", str(e))
        self.check_records()

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
        """A removed cgroup: drop its watch, its index entry and (nft) its map element."""
        wd = self.wd_of.pop(path, None)
        if wd is not None:
            self.watches.pop(wd, None)
            self.inotify.remove(wd)
        self._gone(path)

    def _gone(self, path: str) -> None:
        self.guarded.pop(path, None)
        self._unclassify(path)
        name = self.attached.pop(path, None)
        handle = self.units.get(name) if name is not None else None
        if handle is not None and handle.needs_cleanup:
            self.removed.setdefault(path, (name, time.monotonic()))  # see CLEANUP_IDLE
            return
        self.log.debug("gone", f"{path} removed", cgroup=path, entry=name)

    def cleanup_due(self) -> float | None:
        """When the removed cgroups' cleanup is due (monotonic seconds), None if nothing waits."""
        if not self.removed:
            return None
        oldest = min(when for _, when in self.removed.values())
        return min(self._last_event + CLEANUP_IDLE, oldest + CLEANUP_MAX)

    def cleanup(self) -> None:
        """Drop what units kept for removed cgroups (nft: their elements; a cgroup re-made
        meanwhile keeps its own)."""
        removed, self.removed = self.removed, {}
        for path, (name, _) in removed.items():
            handle = self.units.get(name)
            try:
                dropped = handle is not None and handle.gone(path)
            except BACKEND_ERRORS as e:
                self.log.error("gone", f"{path} removed; dropping its {name} element: {e}", cgroup=path, entry=name)
                continue
            self.log.debug("gone", f"{path} removed" + (f"; its {name} element dropped" if dropped else ""),
                           cgroup=path, entry=name)

    def sync_cgroup(self, path: str, fresh: bool) -> None:
        """Make the cgroup carry exactly its matching entry's filters (of ours).

        A fresh cgroup (just created) cannot carry ours yet, so it skips the query.
        """
        entry = self.policy.match(self.rel(path)) if path != self.root else None
        handle = self.units.get(entry.name) if entry is not None else None
        if handle is not None and handle.guards and self._covered_above(path, handle):
            handle = None  # its guard above judges this one's cgroups too (and counts them once)
        try:
            stale = [] if fresh else self._stale(path, handle)
            if handle is not None and handle.exclusive:
                # one unit of this backend per cgroup: another of ours leaves before this one comes
                stale = self._detach(path, stale, only=handle.backend)
            if handle is not None:
                new = handle.attach(path)
                self.attached[path] = handle.name
                if new and fresh and self.reaction is not None:
                    self.reaction(time.monotonic() - self._last_event)  # handle() set it as it read the event
                if new:
                    self.log.info("attach", f"{handle.name} → {path} ({', '.join(new)})",
                                  unit=os.path.basename(path), cgroup=path, direction=",".join(new),
                                  entry=handle.name, backend=handle.backend)
            if handle is not None and handle.guards:
                self.guarded[path] = handle.name
            else:
                self.guarded.pop(path, None)
            # Told after its own filter is on and before a filter leaving it is off: the
            # guards above never pass what nothing else judges.
            self._classify(path)
            if handle is not None:
                self._to_nest |= nesting.entries_to_nest(path, handle.name, self.root, self.attached, self.units)
            leaving = {name for name, _ in stale if name in self.units and self.units[name].guards}
            if leaving:
                self._hand_down(path, leaving)
            self._detach(path, stale)
            if handle is None:
                self.attached.pop(path, None)
            self._resync.pop(path, None)
        except BACKEND_ERRORS as e:
            if (isinstance(e, KernelError) and is_gone(e)) or not os.path.isdir(path):
                self.log.debug("vanished", f"{path} went away before it was handled", cgroup=path)
                self._resync.pop(path, None)
                self._gone(path)
                return
            repeated = self._resync.get(path) == str(e)
            self.log.event("attach", f"{e}; trying again every {RETRY:g} s", DEBUG if repeated else ERROR,
                           unit=os.path.basename(path), cgroup=path, entry=entry.name if entry is not None else None)
            self._resync[path] = str(e)
            self._schedule_retry()

    # -- slice defaults: what their guards judge ----------------------------------

    def _nest(self) -> None:
        """Build the unit entries found above nearer entries as guards (watch/nesting.py): each is
        loaded again (its programs swapped in place wherever attached), then the cgroups below
        its own are classified for it."""
        while self._to_nest and self.policy is not None:
            names = {n for n in self._to_nest - self.nesting
                     if (e := self.policy.entry(n)) is not None and not e.is_slice_default}
            self._to_nest.clear()
            if not names:
                return
            self.nesting |= names
            for name in sorted(names):
                self.log.info("nest", f"{name}: cgroups inside its own have nearer entries; its filter becomes "
                                      "a guard that leaves their packets to them", unit=name)
            try:
                self.apply_policy(nesting.with_nesting(self.policy, self.nesting))
            except Exception as e:  # noqa: BLE001 — the running filters stay; logged like a failed reload
                self.log.error("nest", f"{', '.join(sorted(names))}: {e}; their filters stay as they are")
                return
            for path in sorted(p for p, n in self.attached.items() if n in names):
                if os.path.isdir(path):
                    self.scan(path, fresh=False)

    def _covered_above(self, path: str, handle) -> bool:
        """Whether the guard of `handle`'s entry on a cgroup above judges this one's cgroups already,
        so that a second one here would judge (and count) them twice. bpf: wherever it sits above
        (its program runs for everything below; the guards in between pass what it judges, see
        _judged_below). nft runs the deepest level's filter only: only when the parent is judged
        by the same entry in every direction it filters (a glob on nested slices)."""
        parent = os.path.dirname(path)
        if path == self.root or not parent.startswith(self.root) or parent == self.root:
            return False
        if handle.runs_below:
            return handle.name in self._guards_over(parent)
        j = judge(self.policy, self.rel(parent))
        entry = self.policy.entry(handle.name)
        directions = [d for d in DIRECTIONS if getattr(entry, d) is not None]
        return all((e := j.entry(d)) is not None and e.name == handle.name for d in directions)

    def _hand_down(self, path: str, names: set[str]) -> None:
        """The guards of entries `names` leave `path`: first put them on the cgroups below that
        they judged from here (a glob default on nested slices sits on the outermost only), so
        that nothing they judged goes unjudged for a moment."""
        for below in cgroup.walk(path):
            if below != path and (e := self.policy.match(self.rel(below))) is not None and e.name in names:
                self.sync_cgroup(below, fresh=False)

    def _guards_over(self, path: str) -> set[str]:
        """The slice defaults whose guards sit on this cgroup or above it."""
        names = set()
        p = path
        while True:
            name = self.guarded.get(p)
            if name is not None and name in self.units:
                names.add(name)
            if p == self.root or len(p) <= len(self.root):
                return names
            p = os.path.dirname(p)

    def _classify(self, path: str) -> None:
        """Tell every guard above (or on) this cgroup which directions of it a deeper filter
        judges: one that is attached, of an entry other than the guard's own (its unit's entry, a
        hand-off unit's, a nested slice's default). The guard judges the rest."""
        names = self._guards_over(path)
        old = self.classified.get(path)
        if not names:
            if old is not None:
                self._unclassify(path)
            return
        cgid = old[0] if old is not None else cgroup.cgroup_id(path)
        j = judge(self.policy, self.rel(path))
        for name in names:
            below = [d for d in DIRECTIONS if self._judged_below(j, d, name)]
            if self.units[name].classify(cgid, below, path):
                self.log.debug("classify", f"{path} under {name}: "
                                           f"{', '.join(below) + ' judged below' if below else 'judged by it'}",
                               cgroup=path, entry=name)
        for name in (old[1] - names) if old is not None else ():
            if name in self.units:
                self.units[name].unclassify(cgid)
        self.classified[path] = (cgid, frozenset(names))

    def _judged_below(self, j, direction: str, guard: str) -> bool:
        """Whether the entry judging this direction is another than `guard` and its filter runs
        for the cgroup already: attached on the judge's cgroup, or its guard on a cgroup above
        that (a glob default on two slices of one path sits on the outer one only)."""
        holder = j.judge(direction)
        if holder is None or holder.entry.name == guard:
            return False
        where = os.path.join(self.root, holder.cgroup) if holder.cgroup else self.root
        return self.attached.get(where) == holder.entry.name or holder.entry.name in self._guards_over(where)

    def _unclassify(self, path: str) -> None:
        old = self.classified.pop(path, None)
        for name in old[1] if old is not None else ():
            handle = self.units.get(name)
            try:
                if handle is not None:
                    handle.unclassify(old[0])
            except BACKEND_ERRORS as e:
                self.log.error("classify", f"{path} removed; dropping it from {name}'s guard: {e}",
                               cgroup=path, entry=name)

    def _prune_guards(self) -> None:
        """After a full rescan: each guard keeps exactly the cgroups it was told about in it
        (entries of cgroups removed while no watcher ran, or no longer below it, go)."""
        for name, handle in self.units.items():
            if not handle.guards:
                continue
            wanted = {cgid: path for path, (cgid, names) in self.classified.items() if name in names}
            try:
                handle.keep_classified(wanted)
            except BACKEND_ERRORS as e:
                self.log.error("classify", f"{name}: {e}", entry=name)

    def _stale(self, path: str, keep) -> list[tuple[str, str]]:
        """(unit, direction) of our filters on this cgroup that are not `keep`'s."""
        out = []
        for backend in self.backends.values():
            for name, d in backend.ours_on(path):
                unit = self.units.get(name)
                if unit is not None and unit.backend == backend.name and not (keep is not None and keep is unit):
                    out.append((name, d))
        return out

    def _detach(self, path: str, stale: list[tuple[str, str]], only: str | None = None) -> list:
        """Detach these (unit, direction) pairs (of backend `only`, or all); the pairs left."""
        left = []
        for name, d in stale:
            unit = self.units[name]
            if only is not None and unit.backend != only:
                left.append((name, d))
                continue
            if unit.detach(path, [d]):
                self.log.info("detach", f"{name} ✕ {path} ({d}): no longer matches",
                              unit=os.path.basename(path), cgroup=path, direction=d, entry=name,
                              backend=unit.backend)
        return left

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
        for backend in self.backends.values():
            if not any(u.backend == backend.name for u in self.units.values()):
                continue
            try:
                dropped = backend.refresh(self.units)
            except BACKEND_ERRORS as e:
                self.log.error("reconcile", f"{backend.name}: {e}", backend=backend.name)
                continue
            for name, path in dropped:
                self.log.info("gone", f"{path} was removed while nobody watched: its {name} element dropped",
                              cgroup=path, entry=name, backend=backend.name)
        old = self.watches
        self.watches, self.wd_of = {}, {}
        seen = self.scan(self.root, fresh=False)
        for path in [p for p in {*self.attached, *self.guarded, *self.classified} if p not in seen]:
            self._gone(path)
        self._prune_guards()
        if self.inotify is not None:
            for wd in set(old) - set(self.watches):
                self.inotify.remove(wd)
        self._nest()
        self.update_status()

    # -- events ---------------------------------------------------------------

    def handle(self, events: list[ino.Event]) -> None:
        self._last_event = time.monotonic()
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
                    self._gone(path)
        if full:
            self.log.warning("reconcile", "inotify queue overflowed: full rescan")
            self.reconcile()
        self._nest()
        self.update_status()

    def reload(self) -> None:
        self.notifier.reloading()
        try:
            policy = nesting.with_nesting(load_policy_checked(self.policy_dir), self.nesting)
            self._claim(policy, watching=True)
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
        unusable = self.state.read()
        if unusable:
            self.log.warning("state", unusable, file=self.state.path)
        for backend in self.backends.values():
            backend.defer_records(True)  # filter first, record after
        if not once:
            try:
                self.inotify = ino.Inotify()
            except ino.InotifyError as e:
                raise WatchError(str(e)) from None
            self._catch_signals()  # from here on a SIGHUP or SIGTERM waits for the loop
        self.nesting = nesting.nesting_from_pins(policy, self.state.units,
                                                 lambda e: self.backends[e.backend].built_as_guard(e.name))
        policy = nesting.with_nesting(policy, self.nesting)
        self._claim(policy, watching=not once)
        self.apply_policy(policy)
        self.reconcile()
        self.unload_removed()
        if unusable:
            self.record()
        self.update_status()
        self.log.info("start", f"{self.status} under {self.root}")
        if once and self._unrecorded:
            self.retry_records()
            if self._unrecorded:
                raise WatchError(f"the filters are attached, but not recorded: {next(iter(self._unrecorded.values()))}")

    def check_pins(self) -> None:
        """A unit whose filters were removed or replaced behind the watcher (bpf: its pins, by
        rm -r, a load by hand, a crash of someone else's load) is loaded again from the policy,
        and every cgroup synced: nothing stays attached that no pin names, and nothing is stacked."""
        self._next_pin_check = time.monotonic() + PIN_CHECK_INTERVAL
        changed = [name for name, h in self.units.items() if not h.intact()]
        if not changed or self.policy is None:
            return
        entries = {e.name: e for e in self.policy.entries}
        for name in changed:
            entry = entries.get(name)
            if entry is None:
                continue
            self.log.warning("pins", f"{name}: its pins were removed or replaced behind the watcher; "
                                     "loading it again from the policy", unit=name)
            backend = self.backends[self.units[name].backend]
            try:
                handle, how = backend.ensure(entry, None)
            except Exception as e:  # noqa: BLE001 — logged; the next check tries again
                self.log.error("load", f"{name}: {e}", unit=name)
                continue
            self.units.pop(name).close()
            self.units[name] = handle
            self.state.units[name] = backend.owned(handle)
            self.record()
        self.reconcile()

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
        guarded: dict = {}  # fd → guard, once registered (a SIGHUP may bring the first entry of a backend)
        forwarded: dict = {}  # fd → drop event source, once registered
        self.notifier.ready(self.status)
        while True:
            for guard in self.guards.values():
                if guard.fd not in guarded:
                    guarded[guard.fd] = guard
                    poller.register(guard.fd, select.POLLIN)
            sources = self._event_sources()
            for fd in sources.keys() - forwarded.keys():
                poller.register(fd, select.POLLIN)
            forwarded = sources
            for fd, _ in poller.poll(self._timeout_ms()):
                if fd in guarded:
                    guarded[fd].readable()
                elif fd in forwarded:
                    self.events.readable(forwarded[fd])
                elif fd == rfd:
                    for signum in _drain(rfd):
                        if signum in STOP_SIGNALS:
                            self.notifier.stopping()
                            self.cleanup()
                            self.log.info("stop", f"{signal.Signals(signum).name}: leaving every "
                                                  "filter attached and loaded")
                            return 0
                        if signum == signal.SIGHUP:
                            self.reload()
                else:
                    self.handle(self.inotify.read())
            for guard in self.guards.values():
                guard.tick()
            if self.events is not None:
                self.events.tick()
            if time.monotonic() >= self._next_pin_check:
                self.check_pins()
            due = self.cleanup_due()
            if due is not None and time.monotonic() >= due:
                self.cleanup()
            self.check_records()
            if self._retry_at is not None and time.monotonic() >= self._retry_at:
                self.retry()

    def _timeout_ms(self) -> int | None:
        """How long poll(2) may wait: until a guard's next check or the cleanup, else forever."""
        waits = [guard.timeout_ms() for guard in self.guards.values()]
        if self.events is not None and (wait := self.events.timeout_ms()) is not None:
            waits.append(wait)
        for due in (self.cleanup_due(), self._retry_at, self._next_pin_check):
            if due is not None:
                waits.append(max(0, int((due - time.monotonic()) * 1000) + 1))
        return min(waits) if waits else None

    def _event_sources(self) -> dict:
        """fd → source of the drop events of each backend the watcher has units of."""
        if self.events is None:
            return {}
        for name in {handle.backend for handle in self.units.values()}:
            self.events.follow(name, self.backends[name])
        return self.events.fds()

    def close(self) -> None:
        if self.events is not None:
            self.events.close()
        if self._unrecorded:
            self.retry_records()  # a last try; what is still unwritten was logged
        for backend in self.backends.values():
            backend.defer_records(False)
        self._release_signals()
        for guard in self.guards.values():
            guard.close()
        self.guards.clear()
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
