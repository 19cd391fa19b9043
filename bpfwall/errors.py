"""The root of every error bpfwall reports to the user: `Error`.

Each layer defines its own subclass — KernelError (kernel/), LangError (lang/),
BuildError, BackendError, NftError, PolicyError, WatchError, RunError,
CapacityError, UnitNameError… — whose message is the one line `bpfwall: error: …`
prints. `main` catches this root (and OSError, and MemoryError), so a new layer
never has to be registered anywhere, and no failure a user can cause ends in a
traceback. This module imports nothing of bpfwall: every layer, the kernel's too,
may derive from it.
"""


class Error(Exception):
    """A problem the user can fix or must know about; str() is the one-line message."""

    def lines(self) -> list[str]:
        """What `bpfwall: error:` prints: the message's first line (subclasses may add lines
        below it, e.g. an expression with a caret under the column)."""
        text = str(self)
        return [text.splitlines()[0] if text else type(self).__name__]


UserError = Error  # the name the layers used before the root was called Error


class UsageError(Error):
    """Bad command-line input found by the command itself (a missing option, a bad value)."""


def os_error_line(e: OSError) -> str:
    """An OSError as one line: 'PATH: what the system said' (or what it said alone)."""
    what = e.strerror or str(e) or type(e).__name__
    return f"{e.filename}: {what}" if e.filename is not None else what
