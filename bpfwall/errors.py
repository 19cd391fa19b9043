"""The error every layer above the kernel raises for the user to read.

Each layer defines one subclass (PolicyError, NftError, WatchError, …) whose
message is the one line `bpfwall: error: …` prints; the CLI catches this base,
so a new layer never has to be registered anywhere.
"""


class UserError(Exception):
    """A problem the user can fix; str() is the one-line message."""


class UsageError(UserError):
    """Bad command-line input found by the command itself (a missing option, a bad value)."""
