"""`bpfwall tune` in a real terminal: a tmux server of the test's own (its own socket, so no
other tmux is touched) with one 80×24 pane; keys sent with send-keys, the screen read with
capture-pane, every wait bounded."""
from __future__ import annotations

import shlex
import subprocess
import time
import uuid

from tests.kernel.invoke import PYTHON, REPO

EXIT_MARK = "TUNE-EXIT"


class Pane:
    def __init__(self, env: dict[str, str], *args: str):
        self.socket = f"bpfwall-test-{uuid.uuid4().hex[:10]}"
        assigns = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        # After tune: a line with its exit status, then the pane stays (for capture) until killed.
        # The shell traps SIGINT (tune gets Ctrl-C as usual) so that it lives on to say it.
        line = (f"trap : INT; cd {shlex.quote(str(REPO))} && env {assigns} {PYTHON} -m bpfwall tune "
                f"{' '.join(map(shlex.quote, args))}; echo {EXIT_MARK} $?; exec sleep 600")
        self.tmux("new-session", "-d", "-x", "80", "-y", "24", "sh", "-c", line)

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, "-f", "/dev/null", *args], check=True,
                              capture_output=True, text=True, timeout=10).stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p")

    def keys(self, *keys: str, literal: bool = False) -> None:
        self.tmux("send-keys", *(["-l"] if literal else []), *keys)

    def type(self, text: str) -> None:
        self.keys(text, literal=True)

    def wait(self, predicate, what: str, timeout: float = 10.0) -> str:
        """The screen once `predicate(screen)` holds; fails after `timeout` seconds showing it."""
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if predicate(screen):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"waited {timeout}s for {what}; the screen:\n{screen}")
            time.sleep(0.1)

    def wait_text(self, text: str, timeout: float = 10.0) -> str:
        return self.wait(lambda s: text in s, repr(text), timeout)

    def alternate_screen(self) -> bool:
        """Whether the pane is in the alternate screen (curses' full-screen mode)."""
        return self.tmux("display-message", "-p", "#{alternate_on}").strip() == "1"

    def cursor_visible(self) -> bool:
        return self.tmux("display-message", "-p", "#{cursor_flag}").strip() == "1"

    def exit_status(self, timeout: float = 10.0) -> int:
        screen = self.wait_text(EXIT_MARK, timeout)
        return int(screen.split(EXIT_MARK, 1)[1].split()[0])

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=10)
