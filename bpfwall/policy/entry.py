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
    def is_glob(self) -> bool:
        from ..unitkey import is_pattern

        return is_pattern(self.name)

    def program(self):
        """The checked expressions built into a UnitProgram (not compiled)."""
        from ..build import UnitProgram
        from ..lang.checker import analyze_pair

        ingress, egress = self.checked
        if (ingress, egress) == (None, None):
            ingress, egress = analyze_pair(self.ingress, self.egress)
        return UnitProgram(ingress, egress, self.set_capacity)

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
                "glob": self.is_glob, "fingerprint": self.fingerprint(), **spec, "sets": self.sets_as_written()}


def show_element(element) -> str:
    """A parsed set element as it is written: 80, 8000..8100, 10.0.0.0/8."""
    if isinstance(element, tuple):
        return f"{element[0]}..{element[1]}"
    return str(element)
