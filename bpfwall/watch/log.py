"""What the watcher did, one record per action: to journald with fields, or one line on stderr.

Journald when systemd started us with stderr connected to the journal
($JOURNAL_STREAM names stderr's device:inode) and the journal socket exists;
$BPFWALL_LOG=journal|stderr overrides. Journal records carry
BPFWALL_ACTION, BPFWALL_DIRECTION, BPFWALL_CGROUP and UNIT, so
`journalctl BPFWALL_ACTION=attach UNIT=nginx.service` finds them.
"""
from __future__ import annotations

import os
import sys

JOURNAL_SOCKET = "/run/systemd/journal/socket"

# syslog priorities, as journald's PRIORITY= field takes them
ERROR, WARNING, NOTICE, INFO, DEBUG = 3, 4, 5, 6, 7
_LABELS = {ERROR: "error: ", WARNING: "warning: "}


def _stderr_is_journal() -> bool:
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


MISSING_SYSTEMD = ("journald should get the records, but the systemd Python module is missing (Debian: "
                   "apt-get install python3-systemd; PyPI: systemd-python, the `systemd` extra): plain lines "
                   "on stderr instead, without the BPFWALL_* fields")


class _Missing(Exception):
    """journald should get our records but systemd-python is not installed."""


def _journal_send():
    """systemd.journal.send when journald should get our records, else None; _Missing when it
    should but the module is not there."""
    choice = os.environ.get("BPFWALL_LOG", "")
    if choice == "stderr" or (choice != "journal" and not _stderr_is_journal()):
        return None
    if not os.path.exists(JOURNAL_SOCKET):
        return None
    try:
        from systemd import journal
    except ImportError:
        raise _Missing() from None
    return journal.send


class Log:
    def __init__(self, verbose: bool = False, send=None, stream=None):
        self.verbose = verbose
        self._stream = stream or sys.stderr
        try:
            self._send = send if send is not None else _journal_send()
        except _Missing:
            self._send = None
            self.warning("log", MISSING_SYSTEMD)

    @property
    def to_journal(self) -> bool:
        return self._send is not None

    def event(self, action: str, message: str, priority: int = INFO, unit: str | None = None,
              cgroup: str | None = None, direction: str | None = None, **fields) -> None:
        """One record. `fields` become BPFWALL_<NAME> journal fields."""
        if priority >= DEBUG and not self.verbose:
            return
        if self._send is not None:
            extra = {"PRIORITY": str(priority), "BPFWALL_ACTION": action, "SYSLOG_IDENTIFIER": "bpfwall"}
            if unit:
                extra["UNIT"] = unit
            if cgroup:
                extra["BPFWALL_CGROUP"] = cgroup
            if direction:
                extra["BPFWALL_DIRECTION"] = direction
            extra.update({f"BPFWALL_{k.upper()}": str(v) for k, v in fields.items() if v is not None})
            try:
                self._send(message, **extra)
                return
            except OSError:
                pass  # journald gone: say it on stderr instead
        print(f"{_LABELS.get(priority, '')}{action}: {message}", file=self._stream, flush=True)

    def record(self, message: str, fields: dict[str, str], priority: int = INFO) -> None:
        """One record with exactly these journal fields (drop events); the message alone on stderr."""
        if self._send is not None:
            try:
                self._send(message, PRIORITY=str(priority), SYSLOG_IDENTIFIER="bpfwall", **fields)
                return
            except OSError:
                pass
        print(message, file=self._stream, flush=True)

    def debug(self, action: str, message: str, **kw) -> None:
        self.event(action, message, DEBUG, **kw)

    def info(self, action: str, message: str, **kw) -> None:
        self.event(action, message, INFO, **kw)

    def warning(self, action: str, message: str, **kw) -> None:
        self.event(action, message, WARNING, **kw)

    def error(self, action: str, message: str, **kw) -> None:
        self.event(action, message, ERROR, **kw)
