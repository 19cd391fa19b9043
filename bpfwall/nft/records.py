"""The nft state as typed records: what the nft backend reads and changes.

The state file (state.py) is JSON; it is checked field by field there and only
then turned into these records (`NftState.from_json`), and written back with
`as_json()`. Nothing else reads the state by string keys.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..events import DEFAULT_LOG_BURST, DEFAULT_LOG_RATE

VERSION = 4  # 3: log_rate/log_burst per unit, log_group per table (a version 2 state reads as log_rate 0);
#             4: strict and known per unit (an older state reads as not strict)
DEFAULT_LOG_GROUP = 2120
DIRECTIONS = ("ingress", "egress")


@dataclass
class SetRecord:
    kind: str            # "number" | "address"
    elements: list[str]  # as stored: "80", "8000..8100", "10.0.0.0/8"

    def as_json(self) -> dict:
        return {"kind": self.kind, "elements": list(self.elements)}


@dataclass
class Objects:
    """The nft objects rendered for a unit now (their names), and each chain's rule count."""
    chains: list[str] = field(default_factory=list)
    sets: list[str] = field(default_factory=list)
    counters: list[str] = field(default_factory=list)
    rules: dict[str, int] = field(default_factory=dict)

    def as_json(self) -> dict:
        return {"chains": list(self.chains), "sets": list(self.sets), "counters": list(self.counters),
                "rules": dict(self.rules)}


@dataclass
class Attachment:
    """A cgroup the unit filters: its path relative to the cgroup2 root, its depth (the level
    map its element is in), its id (what the element holds) and the directions filtered."""
    cgroup: str
    level: int
    id: int
    directions: list[str]

    def as_json(self) -> dict:
        return {"cgroup": self.cgroup, "level": self.level, "id": self.id, "directions": list(self.directions)}


@dataclass
class Known:
    """A cgroup the watcher classified below a strict slice default (or the slice and its
    ancestors): its packets that reach the default are judged, not held."""
    cgroup: str
    id: int

    def as_json(self) -> dict:
        return {"cgroup": self.cgroup, "id": self.id}


@dataclass
class UnitState:
    ingress: str | None  # normalized expressions
    egress: str | None
    params: dict[str, int]
    mode: str
    sets: dict[str, SetRecord] = field(default_factory=dict)
    objects: Objects = field(default_factory=Objects)
    attached: list[Attachment] = field(default_factory=list)
    log_rate: int = DEFAULT_LOG_RATE    # drop events a second (0: none), per direction
    log_burst: int = DEFAULT_LOG_BURST
    strict: bool = False   # a strict slice default: descendants not known are held (dropped)
    known: list[Known] = field(default_factory=list)

    @property
    def directions(self) -> list[str]:
        return [d for d in DIRECTIONS if getattr(self, d) is not None]

    def as_json(self) -> dict:
        return {"ingress": self.ingress, "egress": self.egress, "params": dict(self.params), "mode": self.mode,
                "sets": {n: s.as_json() for n, s in self.sets.items()}, "objects": self.objects.as_json(),
                "attached": [a.as_json() for a in self.attached],
                "log_rate": self.log_rate, "log_burst": self.log_burst,
                "strict": self.strict, "known": [k.as_json() for k in self.known]}

    @classmethod
    def from_json(cls, u: dict) -> "UnitState":
        """A unit of a checked state (version 2 had no log rules: log_rate 0 says so)."""
        o = u["objects"]
        return cls(u["ingress"], u["egress"], dict(u["params"]), u["mode"],
                   {n: SetRecord(s["kind"], list(s["elements"])) for n, s in u["sets"].items()},
                   Objects(list(o["chains"]), list(o["sets"]), list(o["counters"]), dict(o["rules"])),
                   [Attachment(a["cgroup"], a["level"], a["id"], list(a["directions"])) for a in u["attached"]],
                   u.get("log_rate", 0), u.get("log_burst", DEFAULT_LOG_BURST),
                   u.get("strict", False), [Known(k["cgroup"], k["id"]) for k in u.get("known", [])])


@dataclass
class NftState:
    table: str
    units: dict[str, UnitState] = field(default_factory=dict)
    version: int = VERSION
    log_group: int = DEFAULT_LOG_GROUP  # the nflog group every unit's drop events go to

    def as_json(self) -> dict:
        return {"version": VERSION, "table": self.table, "log_group": self.log_group,
                "units": {n: u.as_json() for n, u in self.units.items()}}

    @classmethod
    def from_json(cls, state: dict) -> "NftState":
        """The records of a state that passed state.check_state."""
        return cls(state["table"], {n: UnitState.from_json(u) for n, u in state["units"].items()},
                   state["version"], state.get("log_group", DEFAULT_LOG_GROUP))
