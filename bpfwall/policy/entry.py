"""One policy entry: the filter a unit (or a glob of units) gets, and where it was written."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from ..errors import Error
from ..events import DEFAULT_LOG_BURST, DEFAULT_LOG_RATE


class PolicyError(Error):
    """A policy file the user must fix. str() is the first error as `FILE:LINE: message`;
    `errors` holds every error found, in the same form."""

    def __init__(self, message: str, errors: list[str] | None = None):
        super().__init__(message)
        self.errors = errors if errors is not None else [message]


@dataclass(frozen=True)
class Entry:
    name: str                 # unit name or glob
    ingress: str | None       # expression text as written
    egress: str | None
    params: dict[str, int]
    sets: dict[str, list]     # name -> elements as lang.values.parse_set_elements returns them
    mode: str                 # "enforce" | "audit"
    backend: str              # "bpf" | "nft"
    set_capacity: int
    cgroup: str | None        # glob on the cgroup path (see bpfwall.policy.match), or None
    file: str
    line: int
    # The drop events' limit written in the policy ({log_rate, log_burst}, either may be missing:
    # the unit's current value is kept, or the default on a new load).
    log: dict[str, int] = field(default_factory=dict)
    compiler: str | None = None  # `compiler =` of the file's [defaults] (compilers.CHOICES), if written
    # A slice default only: drop the traffic of a descendant whose own filter is not on yet.
    strict: bool = False
    # A unit entry whose cgroups hold cgroups judged by nearer entries (a delegated unit:
    # user@1000.service with a default on its app.slice, or a user unit's own entry): built as a
    # guard like a slice default, so that its filter judges only what nothing nearer judges. Never
    # written in a policy: the watcher sets it when it finds such a cgroup (backends whose filters
    # run below, bpf).
    guards_nested: bool = False
    # The checked expressions, kept from validation so program() does not parse twice.
    checked: tuple = field(default=(None, None), compare=False, repr=False)

    def __hash__(self) -> int:
        # The generated hash would hash the dicts and fail; equal entries share name and place.
        return hash((self.name, self.file, self.line))

    @property
    def log_rate(self) -> int:
        """The drop events' rate this entry asks for (the default when it writes none)."""
        return self.log.get("log_rate", DEFAULT_LOG_RATE)

    @property
    def log_burst(self) -> int:
        return self.log.get("log_burst", DEFAULT_LOG_BURST)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def is_slice_default(self) -> bool:
        """Does this entry name slices only (`system.slice`, `*.slice`)? Then it sits on slice
        cgroups and is the default of the cgroups below without an entry of their own; every other
        entry sits on the cgroups of the units it names, never on a slice (see judge.py)."""
        from .match import is_slice_name

        return is_slice_name(self.name)

    @property
    def is_glob(self) -> bool:
        from ..unitkey import is_pattern

        return is_pattern(self.name)

    def program(self, compiler: str | None = None):
        """The checked expressions built into a UnitProgram (not compiled), by `compiler` when
        given (the command line's choice), else by the policy's."""
        from ..build import UnitProgram
        from ..lang.checker import analyze_pair

        ingress, egress = self.checked
        if (ingress, egress) == (None, None):
            ingress, egress = analyze_pair(self.ingress, self.egress)
        return UnitProgram(ingress, egress, self.set_capacity, slice_default=self.is_slice_default or self.guards_nested,
                           strict=self.strict,
                           compiler=compiler or self.compiler or "auto")

    def filter_spec(self) -> dict:
        """Everything that defines the filter, normalized: what fingerprint() hashes.
        The cgroup glob and the file position are left out: they say where, not what."""
        program = self.program()
        return {
            "ingress": program.ingress.text if program.ingress is not None else None,
            "egress": program.egress.text if program.egress is not None else None,
            "params": dict(sorted(self.params.items())),
            "sets": {name: sorted({show_element(e) for e in elements})
                     for name, elements in sorted(self.sets.items())},
            "mode": self.mode,
            "backend": self.backend,
            "set_capacity": self.set_capacity,
            **({"compiler": self.compiler} if self.compiler is not None else {}),  # as log: no reload on upgrade
            # only when set, so the fingerprints of entries written before strict existed stay
            **({"strict": True} if self.strict else {}),
            **({"guards_nested": True} if self.guards_nested else {}),
            # only values other than the defaults: entries that write none, or write the defaults,
            # keep the fingerprints they had before drop events existed (no reload on upgrade)
            **({"log": changed} if (changed := {k: v for k, v in sorted(self.log.items())
                                                if v != {"log_rate": DEFAULT_LOG_RATE,
                                                         "log_burst": DEFAULT_LOG_BURST}[k]}) else {}),
        }

    def fingerprint(self) -> str:
        """A stable hash of the filter: equal when only spelling (spaces, element order) differs."""
        data = json.dumps(self.filter_spec(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(data.encode()).hexdigest()

    def sets_as_written(self) -> dict[str, list[str]]:
        """Each set's elements in the order the policy writes them (repeats once): what `policy
        show` prints. The fingerprint sorts them instead, so that order alone changes nothing."""
        return {name: list(dict.fromkeys(show_element(e) for e in elements))
                for name, elements in sorted(self.sets.items())}

    def as_dict(self) -> dict:
        spec = self.filter_spec()
        return {"name": self.name, "file": self.file, "line": self.line, "cgroup": self.cgroup,
                "glob": self.is_glob, "fingerprint": self.fingerprint(), **spec, "sets": self.sets_as_written(),
                "slice_default": self.is_slice_default, "strict": self.strict}


def show_element(element) -> str:
    """A parsed set element as it is written: 80, 8000..8100, 10.0.0.0/8."""
    if isinstance(element, tuple):
        return f"{element[0]}..{element[1]}"
    return str(element)
