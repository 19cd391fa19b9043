"""tune's loop: counters read about once a second, keys handled as they come, changes applied
through `bpfwall set`'s parser and Backend.set_values, and the terminal always restored (curses'
wrapper undoes its modes on return, on Ctrl-C and on any exception)."""
from __future__ import annotations

import curses
import locale
import os
import sys
import time

from ..commands.filters import parse_change
from ..errors import Error
from . import model, view

REFRESH = 1.0  # seconds between counter reads
POLL_MS = 100  # how long a wait for a key lasts: drop events are read between keys

KEYS = {curses.KEY_UP: model.UP, curses.KEY_DOWN: model.DOWN, curses.KEY_LEFT: model.LEFT,
        curses.KEY_RIGHT: model.RIGHT, curses.KEY_SLEFT: model.SLEFT, curses.KEY_SRIGHT: model.SRIGHT,
        curses.KEY_ENTER: model.ENTER, curses.KEY_BACKSPACE: model.BACKSPACE,
        "\n": model.ENTER, "\r": model.ENTER, "\x1b": model.ESCAPE, "\x7f": model.BACKSPACE,
        "\b": model.BACKSPACE}
EVENTS_MISSING = "drop events: not available on this backend yet"


class UnitGone(Error):
    """The unit tune was started for was unloaded underneath it."""


def run(backends: dict, unit: tuple[str, str] | None) -> None:
    """The UI on this terminal until `q`; started on one unit ((backend, unit)) or on the list."""
    locale.setlocale(locale.LC_ALL, "")
    os.environ.setdefault("ESCDELAY", "25")  # Esc answers at once (curses waits for a sequence)
    curses.use_env(False)  # the terminal's size, not $LINES/$COLUMNS: those would pin it through resizes
    gone = curses.wrapper(lambda stdscr: Tuner(stdscr, backends, unit).loop())
    if gone:
        raise UnitGone(f"tune: {gone} was unloaded underneath; tune ended")


class Tuner:
    def __init__(self, stdscr, backends: dict, unit):
        self.win, self.backends, self.single = stdscr, backends, unit is not None
        self.encoding = locale.getpreferredencoding(False)
        self.listing = model.ListScreen()
        self.screen: model.UnitScreen | None = None
        self.source = None
        self.next_tick = 0.0
        if unit is not None:
            self.open(unit)

    # -- the loop ----------------------------------------------------------------------------
    def loop(self) -> str | None:
        """Until `q`; the unit that was unloaded underneath a single-unit tune, if that ended it."""
        try:
            curses.curs_set(0)
        except curses.error:
            pass  # a terminal without an invisible cursor
        self.win.timeout(POLL_MS)
        try:
            while True:
                now = time.monotonic()
                if now >= self.next_tick:
                    self.next_tick = now + REFRESH
                    gone = self.tick()
                    if gone and self.single:
                        return gone
                    self.draw()
                if self.read_events() or self.resized():
                    self.draw()
                try:
                    key = self.win.get_wch()
                except curses.error:
                    continue  # no key within POLL_MS
                if key == curses.KEY_RESIZE:
                    self.draw()
                    continue
                if self.handle(KEYS.get(key, key)) == "quit":
                    return None
                self.draw()
        finally:
            self.close_events()

    def resized(self) -> bool:
        """Whether the terminal's size changed and curses was told: a SIGWINCH that comes while
        curses is not waiting for a key can be missed, so the size is also asked every turn."""
        try:
            size = os.get_terminal_size(sys.__stdout__.fileno())
        except OSError:
            return False
        if (size.lines, size.columns) == self.win.getmaxyx():
            return False
        curses.resizeterm(size.lines, size.columns)
        return True

    def draw(self) -> None:
        if self.screen is not None:
            view.draw_unit(self.win, self.screen, self.encoding)
        else:
            view.draw_list(self.win, self.listing, self.encoding)

    def handle(self, key) -> str | None:
        if self.screen is None:
            action = self.listing.key(key)
            if isinstance(action, tuple):
                self.open(action)
                self.next_tick = 0.0
            return action if action == "quit" else None
        action = self.screen.key(key)
        if action == "quit":
            return "quit"
        if action == "back":
            if self.single:
                return "quit"
            self.leave()
        elif action:
            self.apply(action)
        return None

    # -- reading ---------------------------------------------------------------------------------
    def tick(self) -> str | None:
        """Read the counters of what is shown; the unit shown, if it was unloaded."""
        now = time.monotonic()
        if self.screen is None:
            info, counters, errors = {}, {}, []
            for name, backend in self.backends.items():
                try:
                    rows = backend.summary()
                except Error as e:
                    errors.append(f"{name}: {e.lines()[0]}")
                    continue
                for row in rows:
                    key = (name, row["unit"])
                    info[key] = row
                    if "error" not in row:
                        try:
                            counters[key] = backend.stats(row["unit"])["counters"]
                        except Error:
                            pass  # unloaded between the two reads: gone at the next one
            self.listing.update(info, counters, now)
            if errors:
                self.listing.say("; ".join(errors), error=True)
            return None
        s = self.screen
        try:
            s.update(self.backends[s.backend].stats(s.unit), now)
        except Error as e:
            if self.loaded(s.backend, s.unit):
                s.say(e.lines()[0], error=True)
                return None
            self.leave()
            self.listing.say(f"{s.unit} was unloaded underneath", error=True)
            self.next_tick = 0.0
            return s.unit
        return None

    def loaded(self, backend: str, unit: str) -> bool:
        try:
            return any(r["unit"] == unit for r in self.backends[backend].summary())
        except Error:
            return True  # cannot tell: keep the screen, showing the error

    def read_events(self) -> bool:
        if self.source is None:
            return False
        try:
            events = self.source.read(0)
        except (NotImplementedError, AttributeError):
            self.close_events()
            self.screen.events_note = EVENTS_MISSING
            return True
        except Error as e:
            self.close_events()
            self.screen.events_note = f"drop events: {e.lines()[0]}"
            return True
        for event in events:
            self.screen.events.append(event.line())
        return bool(events)

    # -- changing --------------------------------------------------------------------------------
    def apply(self, text: str) -> None:
        """One change, checked by `bpfwall set`'s parser and applied by the backend all or
        nothing: an error is shown and nothing changes."""
        s = self.screen
        try:
            done = self.backends[s.backend].set_values(s.unit, [parse_change(text)])
        except Error as e:
            s.say(e.lines()[0], error=True)
        else:
            s.say("; ".join(done))
        self.next_tick = 0.0  # show the kernel's values now

    def open(self, key: tuple[str, str]) -> None:
        backend, unit = key
        self.screen = model.UnitScreen(backend, unit)
        try:
            self.source = self.backends[backend].events([unit])
        except (NotImplementedError, AttributeError):
            self.screen.events_note = EVENTS_MISSING
        except Error as e:
            self.screen.events_note = f"drop events: {e.lines()[0]}"

    def leave(self) -> None:
        self.close_events()
        self.screen = None

    def close_events(self) -> None:
        if self.source is not None:
            self.source.close()
            self.source = None
