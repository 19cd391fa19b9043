"""Drawing tune's two screens with curses. Each frame is drawn with erase() and shown with
one doupdate(): curses sends only the cells that changed, so a refresh does not flicker.
Everything is cut to the window, which may be as small as it likes (80×24 is the design)."""
from __future__ import annotations

import curses
import os

from . import model

ASCII_ARROWS = {"↑": "^", "↓": "v", "×": "x", "±": "+-", "→": "->", "·": "-"}


class Painter:
    """Text cut to the window's width, in the terminal's encoding (ASCII bars and arrows when it
    is not UTF-8)."""

    def __init__(self, win, encoding: str):
        self.win = win
        self.utf8 = encoding.lower().replace("-", "") == "utf8"
        self.encoding = encoding

    def text(self, s: str) -> str:
        if not self.utf8:
            for a, b in ASCII_ARROWS.items():
                s = s.replace(a, b)
            s = s.encode(self.encoding, "replace").decode(self.encoding)
        return s

    def put(self, y: int, x: int, s: str, attr: int = 0) -> None:
        h, w = self.win.getmaxyx()
        if not 0 <= y < h or x >= w:
            return
        s = self.text(s)[: max(0, w - x - (1 if y == h - 1 else 0))]  # the last cell cannot be written
        try:
            self.win.addstr(y, x, s, attr)
        except curses.error:
            pass

    def bar(self, values, width: int) -> str:
        return model.sparkline(values, width, model.SPARK if self.utf8 else model.SPARK_ASCII)


def _footer(p: Painter, keys: tuple[str, ...], message: str, error: bool) -> int:
    """The message line and the keys at the bottom; the first row left above them."""
    h, _ = p.win.getmaxyx()
    top = h - len(keys)
    for i, line in enumerate(keys):
        p.put(top + i, 0, line, curses.A_REVERSE)
    if message:
        p.put(top - 1, 0, ("error: " if error else "") + message, curses.A_BOLD if error else 0)
    return top - 1


def draw_list(win, screen: model.ListScreen, encoding: str) -> None:
    p = Painter(win, encoding)
    win.erase()
    h, w = win.getmaxyx()
    p.put(0, 0, f"bpfwall tune · {len(screen.rows)} unit(s) loaded", curses.A_BOLD)
    p.put(1, 0, f"{'UNIT':<24} {'BACKEND':<7} {'MODE':<7} {'PASS/s':>7} {'B/s':>6} {'DROP/s':>7} {'B/s':>6}  ATTACHED",
          curses.A_UNDERLINE)
    bottom = _footer(p, model.LIST_KEYS, screen.message, screen.error)
    if not screen.rows:
        p.put(3, 2, "no units loaded (bpfwall load, or the watcher, puts them here)")
    space = max(1, bottom - 2)
    first = max(0, screen.selected - space + 1)
    for i, key in enumerate(screen.rows[first:first + space]):
        backend, unit = key
        info = screen.info.get(key, {})
        r = model.total_rates(screen.samplers[key].rates) if key in screen.samplers else None
        if "error" in info:
            line = f"{unit:<24} {backend:<7} {info['error']}"
        else:
            cgroups = sorted({a["cgroup"] for a in info.get("attached", [])})
            where = f"{len(cgroups)}: {os.path.basename(cgroups[0])}" if cgroups else "not attached"
            rate = (f"{model.human(r['pass']['packets']):>7} {model.human(r['pass']['bytes']):>6} "
                    f"{model.human(r['drop']['packets']):>7} {model.human(r['drop']['bytes']):>6}") if r else (
                    f"{'…':>7} {'':>6} {'…':>7} {'':>6}")
            line = f"{unit:<24} {backend:<7} {info.get('mode', '?'):<7} {rate}  {where}"
        selected = first + i == screen.selected
        p.put(2 + i, 0, line.ljust(w), curses.A_REVERSE if selected else 0)
    win.noutrefresh()
    curses.doupdate()


def draw_unit(win, screen: model.UnitScreen, encoding: str) -> None:
    p = Painter(win, encoding)
    win.erase()
    h, w = win.getmaxyx()
    s = screen.stats
    cgroups = sorted({a["cgroup"] for a in s.get("attached", [])})
    p.put(0, 0, f"bpfwall tune · {screen.unit} ({screen.backend}) [{s.get('mode', '?')}] "
                f"attached to {len(cgroups)} cgroup(s)", curses.A_BOLD)
    y = 1
    for d in model.DIRECTIONS:
        if s.get(d) is not None:
            p.put(y, 0, f"{d:>7}: {s[d]}")
            y += 1
    drop = "WOULD DROP" if s.get("mode") == "audit" else "DROP"
    p.put(y, 0, f"{'':>7}  {'PASS pkt/s':>10} {'B/s':>7} {drop + ' pkt/s':>16} {'B/s':>7}  "
                f"{'total pass':>10} {'total drop':>10}", curses.A_UNDERLINE)
    y += 1
    counters = s.get("counters", {})
    for d in model.DIRECTIONS:
        if d not in counters:
            continue
        r = screen.sampler.rates.get(d)
        c = counters[d]
        rate = (f"{model.human(r['pass']['packets']):>10} {model.human(r['pass']['bytes']):>7} "
                f"{model.human(r['drop']['packets']):>16} {model.human(r['drop']['bytes']):>7}") if r else (
                f"{'…':>10} {'':>7} {'…':>16} {'':>7}")
        p.put(y, 0, f"{d:>7}  {rate}  {c['pass']['packets']:>10} {c['drop']['packets']:>10}")
        y += 1
    hist = screen.sampler.drop_history
    label = f"drop/s, last {model.HISTORY_SECONDS}s "
    p.put(y, 0, label + p.bar(hist, model.HISTORY_SECONDS) + f" max {model.human(max(hist, default=0))}/s")
    y += 1

    bottom = _footer(p, model.UNIT_KEYS, screen.message, screen.error)
    events_h = max(2, min(7, (bottom - y) // 2))
    events_top = bottom - events_h
    rows = screen.rows
    space = max(1, events_top - y - 1)
    p.put(y, 0, f"VALUES (step {screen.step})".ljust(w), curses.A_UNDERLINE)
    first = max(0, screen.selected - space + 1)
    for i, row in enumerate(rows[first:first + space]):
        if row.kind == "param":
            text = f"${row.name} = {s['params'][row.name]}"
        elif row.kind == "set":
            elements = s["sets"][row.name]
            text = f"@{row.name} = {{{', '.join(map(str, elements))}}}"
        else:
            text = f"mode = {s.get('mode', '?')}  (m toggles enforce/audit)"
        attr = curses.A_REVERSE if first + i == screen.selected else 0
        p.put(y + 1 + i, 0, f" {text}".ljust(w), attr)
    if screen.edit is not None:
        p.put(events_top - 1, 0, f"{screen.edit.prompt}{screen.edit.text}_  (Enter apply, Esc cancel)".ljust(w),
              curses.A_BOLD)

    p.put(events_top, 0, "DROP EVENTS (latest last)".ljust(w), curses.A_UNDERLINE)
    if screen.events_note:
        p.put(events_top + 1, 0, screen.events_note)
    else:
        lines = list(screen.events)[-(events_h - 1):]
        for i, line in enumerate(lines):
            p.put(events_top + 1 + i, 0, line)
        if not lines:
            p.put(events_top + 1, 0, "none yet")
    win.noutrefresh()
    curses.doupdate()
