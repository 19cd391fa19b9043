"""The state of tune's screens and what each key does to it, with no terminal: rates from two
counter reads, the history of a unit's drop rate, and the change text (`bpfwall set`'s syntax,
parsed by the same parser) a key asks for. The app applies that text; nothing here touches
the kernel."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

DIRECTIONS = ("ingress", "egress")
VERDICTS = ("pass", "drop")
HISTORY_SECONDS = 40  # the drop-rate sparkline: one sample a refresh (about a second)
EVENT_LINES = 50      # drop events kept for the bottom panel
STEPS = (1, 10, 100, 1000)
SHIFT_FACTOR = 10
SPARK = "▁▂▃▄▅▆▇█"
SPARK_ASCII = "_.-:=+*#"

# Keys as curses gives them: str for characters, int for the special keys (curses.KEY_*);
# the app translates KEY_UP etc. to these names so the model needs no curses.
UP, DOWN, LEFT, RIGHT, SLEFT, SRIGHT, ENTER, ESCAPE, BACKSPACE = (
    "UP", "DOWN", "LEFT", "RIGHT", "SLEFT", "SRIGHT", "ENTER", "ESCAPE", "BACKSPACE")

LIST_KEYS = ("↑↓/jk select  Enter open  q quit",)
UNIT_KEYS = ("↑↓/jk select  +/- ±step  */_ ±10×step  s step size  Enter type a value",
             "a/d add/remove set elements  m enforce/audit  Esc back  q quit")


# -- counters and rates ---------------------------------------------------------------------

def totals(counters: dict) -> dict[str, dict[str, int]]:
    """{verdict: {"packets", "bytes"}} summed over the directions a unit has."""
    out = {v: {"packets": 0, "bytes": 0} for v in VERDICTS}
    for per_direction in counters.values():
        for v in VERDICTS:
            for k in ("packets", "bytes"):
                out[v][k] += per_direction.get(v, {}).get(k, 0)
    return out


def rates(before: dict, after: dict, seconds: float) -> dict:
    """Per second between two counter reads ({direction: {verdict: {"packets", "bytes"}}}, as
    `stats` gives them), by direction and verdict. A counter that went down (the unit was
    loaded again, its counters new) counts from zero."""
    out = {}
    for d, now in after.items():
        then = before.get(d, {})
        out[d] = {}
        for v in VERDICTS:
            out[d][v] = {}
            for k in ("packets", "bytes"):
                a, b = then.get(v, {}).get(k, 0), now.get(v, {}).get(k, 0)
                delta = b - a if b >= a else b
                out[d][v][k] = delta / seconds if seconds > 0 else 0.0
    return out


def total_rates(by_direction: dict) -> dict[str, dict[str, float]]:
    out = {v: {"packets": 0.0, "bytes": 0.0} for v in VERDICTS}
    for per in by_direction.values():
        for v in VERDICTS:
            for k in ("packets", "bytes"):
                out[v][k] += per[v][k]
    return out


@dataclass
class Sampler:
    """Successive counter reads of one unit: the rates between the last two, and the history
    of its drop rate (packets/s, every direction)."""
    last: tuple[float, dict] | None = None
    rates: dict = field(default_factory=dict)
    drop_history: deque = field(default_factory=lambda: deque(maxlen=HISTORY_SECONDS))

    def add(self, when: float, counters: dict) -> None:
        if self.last is not None and when > self.last[0]:
            self.rates = rates(self.last[1], counters, when - self.last[0])
            self.drop_history.append(total_rates(self.rates)["drop"]["packets"])
        self.last = (when, counters)


def sparkline(values, width: int, chars: str = SPARK) -> str:
    """The last `width` values as bars scaled to their maximum (all zero: the lowest bar)."""
    values = list(values)[-width:] if width > 0 else []
    top = max(values, default=0)
    if top <= 0:
        return chars[0] * len(values)
    return "".join(chars[min(len(chars) - 1, int(v / top * (len(chars) - 1) + 0.5))] for v in values)


def human(n: float, unit: str = "") -> str:
    """A rate or count in at most 6 characters: 950, 12.3k, 4.5M."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{suffix}{unit}"
    return f"{n:.0f}{unit}" if n == int(n) or abs(n) >= 10 else f"{n:.1f}{unit}"


# -- the list of units ------------------------------------------------------------------------

@dataclass
class ListScreen:
    """Every loaded unit: rows of (backend name, unit) with their rates, the selected one kept
    by identity when the list changes under it."""
    rows: list[tuple[str, str]] = field(default_factory=list)
    selected: int = 0
    message: str = ""
    error: bool = False
    info: dict = field(default_factory=dict)      # (backend, unit) → its summary row
    samplers: dict = field(default_factory=dict)  # (backend, unit) → Sampler

    def update(self, info: dict, counters: dict, when: float) -> None:
        """`info`: (backend, unit) → summary row; `counters`: (backend, unit) → its counters."""
        rows = sorted(info)
        current = self.rows[self.selected] if 0 <= self.selected < len(self.rows) else None
        self.rows, self.info = rows, info
        self.samplers = {k: self.samplers.get(k) or Sampler() for k in rows}
        for k, c in counters.items():
            self.samplers[k].add(when, c)
        if current in rows:
            self.selected = rows.index(current)
        self.selected = max(0, min(self.selected, len(rows) - 1))

    def say(self, text: str, error: bool = False) -> None:
        self.message, self.error = text, error

    def key(self, key) -> tuple[str, str] | str | None:
        """"quit", the (backend, unit) to open, or None (moved, or nothing to do)."""
        if key in ("q", "Q"):
            return "quit"
        if key in (UP, "k"):
            self.selected = max(0, self.selected - 1)
        elif key in (DOWN, "j"):
            self.selected = min(len(self.rows) - 1, self.selected + 1) if self.rows else 0
        elif key in (ENTER, RIGHT, "l") and self.rows:
            return self.rows[self.selected]
        return None


# -- one unit ---------------------------------------------------------------------------------

@dataclass
class Row:
    kind: str  # "param" | "set" | "mode"
    name: str


@dataclass
class Edit:
    """A value being typed: the change text is `prefix + text` (`mtu=`, `@blocked+`)."""
    prefix: str
    prompt: str
    text: str = ""


@dataclass
class UnitScreen:
    """One unit's screen: the rows that can be changed (params, sets, mode), the selection, the
    step of +/-, a value being typed, and the last message (an error is shown as such)."""
    backend: str
    unit: str
    stats: dict = field(default_factory=dict)
    sampler: Sampler = field(default_factory=Sampler)
    selected: int = 0
    step_index: int = 0
    edit: Edit | None = None
    message: str = ""
    error: bool = False
    events: deque = field(default_factory=lambda: deque(maxlen=EVENT_LINES))
    events_note: str = ""  # why there are no events to show (the backend has none yet)

    @property
    def step(self) -> int:
        return STEPS[self.step_index]

    @property
    def rows(self) -> list[Row]:
        s = self.stats
        return ([Row("param", n) for n in s.get("params", {})] + [Row("set", n) for n in s.get("sets", {})]
                + [Row("mode", "mode")])

    def update(self, stats: dict, when: float) -> None:
        self.stats = stats
        self.sampler.add(when, stats.get("counters", {}))
        self.selected = max(0, min(self.selected, len(self.rows) - 1))

    def say(self, text: str, error: bool = False) -> None:
        self.message, self.error = text, error

    def key(self, key):
        """What `key` asks for: "quit", "back", a change text for `bpfwall set` (applied by the
        app, which reports the result with say()), or None."""
        if self.edit is not None:
            return self._edit_key(key)
        rows = self.rows
        row = rows[self.selected] if rows else None
        if key in ("q", "Q"):
            return "quit"
        if key == LEFT and row is not None and row.kind == "param":
            return self._bump(row, -1)
        if key in (ESCAPE, LEFT, BACKSPACE, "b"):
            return "back"
        if key in (UP, "k"):
            self.selected = max(0, self.selected - 1)
        elif key in (DOWN, "j"):
            self.selected = min(len(rows) - 1, self.selected + 1)
        elif key == "s":
            self.step_index = (self.step_index + 1) % len(STEPS)
            self.say(f"step {self.step} (×{SHIFT_FACTOR} with * and _)")
        elif key == "m" or (row is not None and row.kind == "mode" and key in (ENTER, "+", "-", "=")):
            return f"mode={'enforce' if self.stats.get('mode') == 'audit' else 'audit'}"
        elif row is None:
            return None
        elif row.kind == "param" and key in ("+", "=", RIGHT):
            return self._bump(row, 1)
        elif row.kind == "param" and key == "-":
            return self._bump(row, -1)
        elif row.kind == "param" and key in ("*", SRIGHT):
            return self._bump(row, SHIFT_FACTOR)
        elif row.kind == "param" and key in ("_", SLEFT):
            return self._bump(row, -SHIFT_FACTOR)
        elif row.kind == "param" and key == ENTER:
            self.edit = Edit(f"{row.name}=", f"${row.name} = ")
        elif row.kind == "set" and key in ("a", "+", ENTER):
            self.edit = Edit(f"@{row.name}+", f"add to @{row.name}: ")
        elif row.kind == "set" and key in ("d", "x", "-"):
            self.edit = Edit(f"@{row.name}-", f"remove from @{row.name}: ")
        return None

    def _bump(self, row: Row, times: int) -> str:
        """The change for the param moved by `times` steps; below 0 it is still asked for (and
        refused by the parser like a typed -1), so the user sees why nothing moved."""
        return f"{row.name}={self.stats['params'][row.name] + times * self.step}"

    def _edit_key(self, key):
        e = self.edit
        if key == ESCAPE:
            self.edit = None
            self.say("cancelled")
        elif key == ENTER:
            self.edit = None
            return e.prefix + e.text.strip()
        elif key == BACKSPACE:
            e.text = e.text[:-1]
        elif isinstance(key, str) and len(key) == 1 and key.isprintable():
            e.text += key
        return None
