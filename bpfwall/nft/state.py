"""The state file of one bpfwall nft table: everything needed to rebuild it.

    {"bpfwall": "nft-state", "sha256": "<digest of the rest of the file>"}
    {"version": 4, "table": "bpfwall", "log_group": 2120, "units": {
        "nginx.service": {
            "ingress": "tcp && local_port == 80", "egress": null,   # normalized expressions
            "params": {"extra": 0}, "mode": "enforce", "log_rate": 10, "log_burst": 50,
            "sets": {"ports": {"kind": "number", "elements": ["80", "8000..8100"]}},
            "objects": {"chains": [...], "sets": [...], "counters": [...],  # rendered now
                        "rules": {chain: number of rules}},
            "attached": [{"cgroup": "system.slice/nginx.service", "level": 2, "id": 1234,
                          "directions": ["ingress"]}],
            "strict": false, "known": []}}}    # a strict slice default: the cgroups classified below it

It lives at `$BPFWALL_NFT_STATE_DIR/<table>.json` (default /run/bpfwall/nft), a
directory only root can use (kernel/safefs.py), is replaced atomically (write, then
rename) and changed only under an exclusive lock on `<table>.lock`, so the guard
never restores a half-made change.

The guard rebuilds the table from this file, so it is checked before anything
uses it: the first line's digest must match (a file changed by hand or damaged
is refused, not restored as written), and every field must have its type and
shape — above all what reaches nft syntax (levels are integers) or names nft
objects (only the unit's own names) — else one line says which field is wrong.
Only a state that passed is turned into the typed records the backend uses
(records.py: NftState, UnitState, Attachment…); `save` writes them back as JSON.

Recording: a one-shot command writes the new state to a temporary file before
its nft transaction (`recording()`), so a full disk changes nothing. The watcher
(`StateFile.record_later = True`) filters first: a state the disk cannot take is
kept in memory, returned by load() and written by the next save or by
retry_unrecorded(), so a full disk never leaves a cgroup unfiltered.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from contextlib import contextmanager

from ..events import check_log_setting
from ..lower.nft import SET_TYPES
from ..kernel.safefs import PrivateDir
from .errors import NftError
from .names import UnitNames, check_table
from .records import VERSION, NftState

DEFAULT_STATE_DIR = "/run/bpfwall/nft"
MAGIC = "nft-state"
DIRECTIONS = ("ingress", "egress")
MODES = ("enforce", "audit")
U64 = 2**64 - 1
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_UNIT_KEYS = {"ingress", "egress", "params", "mode", "sets", "objects", "attached"}
_LOG_KEYS = {"log_rate", "log_burst"}  # since version 3
_STRICT_KEYS = {"strict", "known"}  # since version 4
_OBJECT_KEYS = {"chains", "sets", "counters", "rules"}
_RECORD_KEYS = {"cgroup", "level", "id", "directions"}


def state_dir() -> str:
    return os.environ.get("BPFWALL_NFT_STATE_DIR") or DEFAULT_STATE_DIR


class Invalid(ValueError):
    """A field of the state that is not what bpfwall writes; str() names it."""


# -- checking a state -------------------------------------------------------------------------

def _expect(ok: bool, where: str, what: str) -> None:
    if not ok:
        raise Invalid(f"{where}: {what}")


def _is_int(value, lo: int = 0, hi: int = U64) -> bool:
    return type(value) is int and lo <= value <= hi


def _keys(value, keys: set, where: str) -> None:
    _expect(isinstance(value, dict), where, "expected an object")
    missing, unknown = keys - set(value), set(value) - keys
    _expect(not missing, where, f"missing {', '.join(sorted(missing))}")
    _expect(not unknown, where, f"unknown field {', '.join(sorted(unknown))}")


def _names(value, where: str) -> list:
    _expect(isinstance(value, list) and all(isinstance(n, str) for n in value), where, "expected a list of names")
    _expect(len(set(value)) == len(value), where, "a name occurs twice")
    return value


def _cgroup_path(path, where: str) -> None:
    _expect(isinstance(path, str) and path != "", where, "expected a cgroup path")
    _expect("\0" not in path and not path.startswith("/") and os.path.normpath(path) == path
            and ".." not in path.split("/") and path != ".", where,
            f"{path!r} is not a path relative to the cgroup2 root")


def check_unit(unit: str, u, where: str, version: int = VERSION) -> None:
    """Raise Invalid unless `u` is a unit record as bpfwall writes it for `unit`."""
    _keys(u, _UNIT_KEYS | (_LOG_KEYS if version >= 3 else set()) | (_STRICT_KEYS if version >= 4 else set()), where)
    if version >= 4:
        _expect(isinstance(u["strict"], bool), f"{where}.strict", "expected true or false")
        _expect(isinstance(u["known"], list) and (u["strict"] or not u["known"]), f"{where}.known",
                "expected a list (empty unless strict)")
        for i, k in enumerate(u["known"]):
            _keys(k, {"cgroup", "id"}, f"{where}.known[{i}]")
            _cgroup_path(k["cgroup"], f"{where}.known[{i}].cgroup")
            _expect(_is_int(k["id"], 1), f"{where}.known[{i}].id", "expected a cgroup id")
    for key in sorted(_LOG_KEYS & set(u)):
        try:
            check_log_setting(key, u[key])
        except ValueError as e:
            raise Invalid(f"{where}.{key}: {e}") from None
    logged = u.get("log_rate", 0) > 0
    directions = []
    for d in DIRECTIONS:
        _expect(u[d] is None or isinstance(u[d], str), f"{where}.{d}", "expected an expression or null")
        if u[d] is not None:
            directions.append(d)
    _expect(u["mode"] in MODES, f"{where}.mode", f"expected {' or '.join(MODES)}")
    _expect(isinstance(u["params"], dict), f"{where}.params", "expected an object")
    for name, value in u["params"].items():
        _expect(_IDENT.fullmatch(name) is not None, f"{where}.params", f"{name!r} is not a parameter name")
        _expect(_is_int(value), f"{where}.params.{name}", f"expected an integer 0..{U64}")
    _expect(isinstance(u["sets"], dict), f"{where}.sets", "expected an object")
    for name, s in u["sets"].items():
        _expect(_IDENT.fullmatch(name) is not None, f"{where}.sets", f"{name!r} is not a set name")
        _keys(s, {"kind", "elements"}, f"{where}.sets.{name}")
        _expect(s["kind"] in ("number", "address"), f"{where}.sets.{name}.kind", "expected number or address")
        _expect(isinstance(s["elements"], list) and all(isinstance(e, str) and e and "," not in e
                                                        for e in s["elements"]),
                f"{where}.sets.{name}.elements", "expected a list of elements")

    # Object names are deleted and flushed by name: they must be this unit's own.
    objects, names = u["objects"], UnitNames(unit)
    _keys(objects, _OBJECT_KEYS, f"{where}.objects")
    chains = _names(objects["chains"], f"{where}.objects.chains")
    mine = {names.chain(d, i) for d in directions for i in range(len(chains))}
    _expect(set(chains) <= mine, f"{where}.objects.chains", f"names a chain that is not {unit}'s")
    counters = _names(objects["counters"], f"{where}.objects.counters")
    kinds = ("pass", "drop", "lost") if logged else ("pass", "drop")
    _expect(set(counters) == {names.counter(d, v) for d in directions for v in kinds},
            f"{where}.objects.counters", f"not {unit}'s counters")
    sets = _names(objects["sets"], f"{where}.objects.sets")
    _expect(set(sets) <= {names.set(s, t) for s in u["sets"] for t in SET_TYPES},
            f"{where}.objects.sets", f"names a set that is not {unit}'s")
    rules = objects["rules"]
    _expect(isinstance(rules, dict) and set(rules) == set(chains) and all(_is_int(n, 1) for n in rules.values()),
            f"{where}.objects.rules", "expected a positive rule count for each chain")

    _expect(isinstance(u["attached"], list), f"{where}.attached", "expected a list")
    for i, a in enumerate(u["attached"]):
        at = f"{where}.attached[{i}]"
        _keys(a, _RECORD_KEYS, at)
        _cgroup_path(a["cgroup"], f"{at}.cgroup")
        _expect(_is_int(a["level"], 1, 255) and a["level"] == a["cgroup"].count("/") + 1, f"{at}.level",
                "expected the depth of the cgroup (an integer)")
        _expect(_is_int(a["id"], 1), f"{at}.id", "expected a cgroup id")
        ds = a["directions"]
        _expect(isinstance(ds, list) and ds and len(set(ds)) == len(ds) and set(ds) <= set(directions),
                f"{at}.directions", f"expected some of {', '.join(directions) or 'no directions'}")


def check_state(state, table: str) -> None:
    """Raise Invalid unless `state` is a state of `table` as bpfwall writes it."""
    _expect(isinstance(state, dict) and state.get("version") in (2, 3, VERSION), "version",
            f"this bpfwall reads versions 2 to {VERSION}")
    version = state["version"]
    _keys(state, {"version", "table", "units"} | ({"log_group"} if version >= 3 else set()), "the state")
    if version >= 3:
        _expect(_is_int(state["log_group"], 0, 65535), "log_group", "expected an nflog group 0..65535")
    _expect(state["table"] == table, "table", f"expected {table!r}")
    _expect(isinstance(state["units"], dict), "units", "expected an object")
    for unit, u in state["units"].items():
        try:
            UnitNames(unit)
        except NftError:
            raise Invalid(f"units: {unit!r} is not a unit name") from None
        check_unit(unit, u, f"units.{unit}", version)


def encode(state: dict) -> bytes:
    """The file's contents for a state in its JSON form (NftState.as_json())."""
    body = json.dumps(state, separators=(",", ":")).encode()  # one C-encoder call
    header = json.dumps({"bpfwall": MAGIC, "sha256": hashlib.sha256(body).hexdigest()}).encode()
    return header + b"\n" + body


# -- the file ----------------------------------------------------------------------------------

class StateFile:
    record_later = False  # the watcher: a state the disk cannot take waits in memory (see above)
    _unrecorded: dict[str, tuple[bytes, tuple | None, str]] = {}  # path → (file data, file seen, error)
    _lost: list[str] = []     # paths whose unrecorded state another writer replaced
    _trusted: dict[str, str] = {}  # path → digest of the contents this process wrote or checked

    def __init__(self, table: str, directory: str | None = None):
        self.table = check_table(table)
        self.dir = directory or state_dir()
        self.name = f"{table}.json"
        self.path = os.path.join(self.dir, self.name)
        self.lock_name = f"{table}.lock"
        self._open: PrivateDir | None = None  # while locked

    @contextmanager
    def _directory(self):
        if self._open is not None:
            yield self._open
            return
        with PrivateDir(self.dir, "the nft state directory", NftError) as d:
            yield d

    @contextmanager
    def locked(self):
        with PrivateDir(self.dir, "the nft state directory", NftError) as d:
            fd = d.open_lock(self.lock_name)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                d.remove_temps(self.name)  # what a writer killed mid-write left
                self._open = d
                yield
            finally:
                self._open = None
                os.close(fd)

    def empty(self) -> NftState:
        return NftState(self.table)

    def load(self) -> NftState:
        with self._directory() as d:
            waiting = self._waiting(d)
            data = waiting if waiting is not None else d.read(self.name)
        if data is None:
            return self.empty()
        return self.decode(data)

    def decode(self, data: bytes) -> NftState:
        """The state in `data` (a file's contents), checked; NftError naming what is wrong."""
        head, _, body = data.partition(b"\n")
        try:
            header = json.loads(head)
        except ValueError:
            header = None
        if not isinstance(header, dict) or header.get("bpfwall") != MAGIC:
            raise self._refuse("is not a bpfwall nft state of this version (no checksum line)")
        digest = hashlib.sha256(body).hexdigest()
        if header.get("sha256") != digest:
            raise self._refuse("was changed outside bpfwall or is damaged: its checksum does not match")
        try:
            state = json.loads(body)
        except (ValueError, RecursionError) as e:
            raise self._refuse(f"is not valid JSON ({e})") from None
        if StateFile._trusted.get(self.path) != digest:
            try:
                check_state(state, self.table)
            except Invalid as e:
                raise self._refuse(f"is not a valid state: {e}") from None
            StateFile._trusted[self.path] = digest
        return NftState.from_json(state)

    def _refuse(self, problem: str) -> NftError:
        return NftError(f"the nft state {self.path} {problem}; bpfwall does not restore from it. Move it away, "
                        f"delete the table (nft delete table inet {self.table}) and load its units again "
                        "(a restarted bpfwall watch loads its policy's)")

    def save(self, state: NftState) -> None:
        """Record `state` (after the kernel change it describes)."""
        with self._directory() as d:
            if not state.units:
                StateFile._unrecorded.pop(self.path, None)
                d.unlink(self.name)
                return
            data = encode(state.as_json())
            try:
                d.replace(self.name, data)
            except NftError as e:
                if not StateFile.record_later:
                    raise NftError(f"{e}; the change is made in nft but not recorded") from None
                self._keep(d, data, str(e))
                return
            self._recorded(data)

    @contextmanager
    def recording(self, state: NftState):
        """Record `state` around the kernel change the block makes: written to a temporary
        file first (a full disk raises here, before any change), renamed into place after the
        block succeeded, discarded if it fails. With record_later, the change goes ahead even if
        the disk is full, and the state waits in memory."""
        with self._directory() as d:
            if not state.units:
                yield
                StateFile._unrecorded.pop(self.path, None)
                d.unlink(self.name)
                return
            data = encode(state.as_json())
            temp, error = None, None
            try:
                temp = d.stage(self.name, data)
            except NftError as e:
                if not StateFile.record_later:
                    raise
                error = str(e)
            try:
                yield
            except BaseException:
                if temp is not None:
                    d.discard(temp)
                raise
            if temp is not None:
                try:
                    d.commit(temp, self.name)
                    self._recorded(data)
                    return
                except NftError as e:
                    error = str(e)
            self._keep(d, data, error)

    def remove(self) -> None:
        with self._directory() as d:
            StateFile._unrecorded.pop(self.path, None)
            d.unlink(self.name)

    # -- a state the disk could not take --------------------------------------------------------

    @staticmethod
    def _seen(d: PrivateDir, name: str) -> tuple | None:
        st = d.lstat(name)
        return None if st is None else (st.st_ino, st.st_mtime_ns, st.st_size)

    def _keep(self, d: PrivateDir, data: bytes, error: str) -> None:
        StateFile._unrecorded[self.path] = (data, self._seen(d, self.name), error)

    def _recorded(self, data: bytes) -> None:
        StateFile._unrecorded.pop(self.path, None)
        StateFile._trusted[self.path] = hashlib.sha256(data.partition(b"\n")[2]).hexdigest()

    def _waiting(self, d: PrivateDir) -> bytes | None:
        """The unrecorded state of this file, while the file is the one it was made over."""
        waiting = StateFile._unrecorded.get(self.path)
        if waiting is None:
            return None
        data, seen, _ = waiting
        if self._seen(d, self.name) != seen:  # written by another process since: its turn now
            del StateFile._unrecorded[self.path]
            StateFile._lost.append(self.path)
            return None
        return data

    @classmethod
    def unrecorded(cls) -> dict[str, str]:
        """{state file: why it could not be written} of the states waiting in memory."""
        return {path: error for path, (_, _, error) in cls._unrecorded.items()}

    @classmethod
    def take_lost(cls) -> list[str]:
        """The state files whose waiting state another writer replaced since the last call
        (the changes it held are in nft but no longer recorded: reconcile)."""
        lost, cls._lost = cls._lost, []
        return lost

    @classmethod
    def retry_unrecorded(cls) -> list[str]:
        """Try to write every waiting state again (each under its lock); the files written."""
        done = []
        for path in list(cls._unrecorded):
            table = os.path.basename(path)[:-len(".json")]
            sf = cls(table, os.path.dirname(path))
            with sf.locked():
                with sf._directory() as d:
                    data = sf._waiting(d)
                    if data is None:
                        continue
                    try:
                        d.replace(sf.name, data)
                    except NftError as e:
                        sf._keep(d, data, str(e))
                        continue
                    sf._recorded(data)
                    done.append(path)
        return done
