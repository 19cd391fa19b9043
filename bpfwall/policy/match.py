"""Which policy entry polices a cgroup.

A cgroup is named by its path relative to the cgroup2 root, e.g.
`system.slice/nginx.service` or
`user.slice/user-1000.slice/user@1000.service/app.slice/foo.service`.

Rules, in order:

1. Only the LAST path component is a candidate, and only if it looks like a
   unit: it ends in .service, .scope, .slice, .socket, .mount or .swap. So
   `system.slice/nginx.service/sub` (a sub-cgroup inside a unit) matches
   nothing: the program sits on the unit's own cgroup and the sub-cgroups
   inherit it from there.
2. An entry's name matches the component with fnmatch rules, case-sensitive
   (`app-firefox-*.scope`, `getty@tty?.service`); a name without glob
   characters must be equal.
3. If the entry has `cgroup = GLOB`, the glob must match the END of the path,
   component by component (so `*` never crosses a '/'): `app.slice/*` matches
   `…/user@1000.service/app.slice/x.service` but not `…/app.slice/a.slice/x.service`.
   `**` stands for any number of components (also none); a glob starting with
   '/' is anchored at the cgroup2 root and must match the whole path.
4. Slices and other units are named apart: an entry whose name ends in
   `.slice` (`system.slice`, `*.slice`, `user-*.slice`) is a slice default and
   matches only slice cgroups; every other entry (`nginx.service`, `*`,
   `app-*`) names units and never matches a slice, whatever its glob would
   match. A slice default is the default of the cgroups below the slice that
   have no entry of their own: judge.py says which entry judges a cgroup.
5. Precedence: an exact name beats every glob; among globs the first one in
   file order wins (files sorted by name, entries in the order written).
   An entry whose cgroup glob does not match is no candidate, so a later
   entry can still match.

`Policy.match` answers "which entry sits on this cgroup"; which entry judges
its packets (the nearest one up the tree) is `judge.judge`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from .entry import Entry

UNIT_SUFFIXES = (".service", ".scope", ".slice", ".socket", ".mount", ".swap")
SLICE_SUFFIX = ".slice"


def is_slice_name(name: str) -> bool:
    """Does this unit name, or glob, name slices only? A glob ending in `.slice` matches only names
    ending in it (fnmatch has no escapes and a bracket ends in `]`), so the test is the suffix."""
    return name.endswith(SLICE_SUFFIX)


def unit_component(cgroup_rel: str) -> str | None:
    """The last path component if it looks like a unit, else None."""
    last = cgroup_rel.strip("/").rsplit("/", 1)[-1]
    if last.endswith(UNIT_SUFFIXES) and len(last) > len(last.rsplit(".", 1)[-1]) + 1:
        return last
    return None


def cgroup_glob_matches(glob: str, cgroup_rel: str) -> bool:
    parts = [p for p in cgroup_rel.split("/") if p]
    if glob.startswith("/"):
        return _match_parts(glob[1:].split("/"), parts)
    # Unanchored: the glob matches a non-empty tail of the path, which is what a leading ** does.
    return bool(parts) and _match_parts(["**"] + glob.split("/"), parts)


def _match_parts(globs: list[str], parts: list[str]) -> bool:
    """Do the component globs match exactly these components?

    Runs the globs as an NFA over the components: the state set holds every number of globs
    that can have matched the components read so far. A path of n components against m globs
    costs at most n * m fnmatch calls, however many `**` there are (trying each way to split
    the path among the `**`s instead took exponential time: a delegated subtree's owner picks
    the depth)."""
    states = _closure(globs, {0})
    for part in parts:
        following = set()
        for i in states:
            if i == len(globs):
                continue
            if globs[i] == "**":
                following.add(i)  # ** takes this component too
            elif fnmatchcase(part, globs[i]):
                following.add(i + 1)
        states = _closure(globs, following)
        if not states:
            return False
    return len(globs) in states


def _closure(globs: list[str], states: set[int]) -> set[int]:
    """The states plus those reached by letting each ** match no component."""
    out = set()
    for i in states:
        out.add(i)
        while i < len(globs) and globs[i] == "**":
            i += 1
            out.add(i)
    return out


# judge() asks match() for each prefix of every cgroup path; a bounded memo keeps a walk over
# a large tree from redoing the globs for the shared slices.
MATCH_CACHE_MAX = 65536


@dataclass
class MatchReport:
    """The answer to "who polices this cgroup", with the reasons."""
    cgroup: str
    unit: str | None                  # the unit-looking last component, if any
    entry: Entry | None
    reason: str
    passed_over: list[tuple[Entry, str]] = field(default_factory=list)  # candidates that lost, and why

    def as_dict(self) -> dict:
        return {"cgroup": self.cgroup, "unit": self.unit, "reason": self.reason,
                "entry": None if self.entry is None else
                {"name": self.entry.name, "file": self.entry.file, "line": self.entry.line},
                "passed_over": [{"name": e.name, "file": e.file, "line": e.line, "why": why}
                                for e, why in self.passed_over]}


class Policy:
    def __init__(self, entries: list[Entry]):
        self.entries = list(entries)
        self._by_name = {e.name: e for e in self.entries}
        self._globs = [e for e in self.entries if e.is_glob]
        self._matched: dict[str, Entry | None] = {}  # match() per path: judge() asks for every prefix

    def entry(self, name: str) -> Entry | None:
        """The entry written with exactly this name (a unit name or a glob)."""
        return self._by_name.get(name)

    def match(self, cgroup_rel: str) -> Entry | None:
        """The entry that sits on this cgroup (a unit's entry on its cgroup, a slice default on its
        slice), or None."""
        path = cgroup_rel.strip("/")
        try:
            return self._matched[path]
        except KeyError:
            pass
        if len(self._matched) >= MATCH_CACHE_MAX:
            self._matched.clear()
        found = self._matched[path] = self.explain(path).entry
        return found

    def explain(self, cgroup_rel: str, legacy: bool = False) -> MatchReport:
        """Which entry sits on this cgroup, and why; `legacy`: by the rule before slice defaults,
        when a glob of units also matched slices (only `policy check`'s warnings ask)."""
        path = cgroup_rel.strip("/")
        unit = unit_component(path)
        if unit is None:
            last = path.rsplit("/", 1)[-1] or "(the root)"
            return MatchReport(path, None, None, f"'{last}' is not a unit cgroup (no unit suffix: "
                               + ", ".join(UNIT_SUFFIXES) + "); a sub-cgroup inherits its unit's program")
        passed: list[tuple[Entry, str]] = []
        exact = self._by_name.get(unit)
        candidates = ([exact] if exact is not None and not exact.is_glob else []) + \
            [e for e in self._globs if fnmatchcase(unit, e.name)]
        if not legacy and is_slice_name(unit):
            passed += [(e, f"'{e.name}' names units, not slices: only an entry whose name ends in "
                           f"{SLICE_SUFFIX} is a slice default") for e in candidates if not e.is_slice_default]
            candidates = [e for e in candidates if e.is_slice_default]
        for i, e in enumerate(candidates):
            if e.cgroup is not None and not cgroup_glob_matches(e.cgroup, path):
                passed.append((e, f"cgroup glob '{e.cgroup}' does not match the path"))
                continue
            how = "exact name" if not e.is_glob else f"glob '{e.name}', the first matching glob in file order"
            if e.cgroup is not None:
                how += f", cgroup glob '{e.cgroup}' matches"
            for other in candidates[i + 1:]:
                passed.append((other, "an exact name comes first" if not e.is_glob
                               else "a glob earlier in file order matched first"))
            return MatchReport(path, unit, e, f"{how} ({e.file}:{e.line})", passed)
        if not passed:
            reason = f"no entry names {unit}"
        elif candidates:
            reason = "every entry naming it has a cgroup glob that does not match"
        else:
            reason = f"no slice default names {unit} (only globs of other units match its name)"
        return MatchReport(path, unit, None, reason, passed)
