"""Finding and reading the policy files: a directory of *.toml, or files named explicitly;
only from places nobody but root (or the euid) could have written.

The policy decides what every unit may send and receive, so, as sshd's StrictModes does
for authorized_keys, a policy file is refused unless it is a regular file, not a symbolic
link, owned by root (or the user bpfwall runs as) and not writable by group or others (an
ACL granting write shows in the group bits as its mask, so it is refused too); the same
holds for its directory and every directory above it up to `/` (kernel/safefs.py).

A sticky world-writable directory such as /tmp is refused above a policy as well, like sshd
does: anyone may create names in it, so a policy kept there can be squatted or swapped by
whoever gets to a name first. Symbolic links ABOVE the policy directory (say /var/run → /run)
are resolved first and every directory they lead to is checked; the policy directory itself
and the files in it must not be links.
"""
from __future__ import annotations

import dataclasses
import os
import stat

from ..kernel import safefs
from .entry import PolicyError
from .match import Policy
from .schema import check_document, show_path

DEFAULT_POLICY_DIR = "/etc/bpfwall"
RULES = safefs.Rules(what="the policy directory", file_what="the policy file", ours=False,
                     sticky_above=False, resolve_above=True,
                     elsewhere=f"keep policy files where only root can write, e.g. in {DEFAULT_POLICY_DIR}",
                     name_option="--policy-dir {0} or BPFWALL_POLICY_DIR={0}")
_FILE_RULES = dataclasses.replace(RULES, what="its directory")


def _policy_error(e: safefs.PathError) -> PolicyError:
    return PolicyError(str(e))


def _open_policy_dir(directory: str) -> safefs.CheckedDir:
    """The policy directory, every directory from / to it checked; PolicyError naming what is
    wrong and the fix."""
    return safefs.CheckedDir.open(directory, RULES, error=_policy_error)


def _open_file_dir(file: str) -> safefs.CheckedDir:
    """The directory of a policy file named explicitly, opened only to read that file (O_PATH):
    it may be reached through a link; the file itself may not be one."""
    parent = os.path.dirname(file)
    return safefs.CheckedDir.open(os.path.realpath(parent or "."), _FILE_RULES, listing=False, subject=file,
                                  error=_policy_error)


def policy_dir(directory: str | None = None) -> str:
    """--policy-dir, else $BPFWALL_POLICY_DIR, else /etc/bpfwall."""
    return directory or os.environ.get("BPFWALL_POLICY_DIR") or DEFAULT_POLICY_DIR


def policy_files(directory: str | None = None) -> list[str]:
    """Every *.toml in the directory, sorted by name; dotfiles (editor locks and temporaries) are
    skipped. PolicyError if the directory is not one bpfwall trusts (see the module doc)."""
    directory = policy_dir(directory)
    with _open_policy_dir(directory) as d:
        return [os.path.join(directory, n) for n in _policy_names(d)]


def _policy_names(d: safefs.CheckedDir) -> list[str]:
    # Anything else named *.toml is read, and refused unless it is a regular file (a symlink too);
    # what was removed while listing is skipped.
    return [n for n in d.names() if n.endswith(".toml") and not n.startswith(".")
            and (st := d.lstat(n)) is not None and not stat.S_ISDIR(st.st_mode)]


def _decode(file: str, data: bytes) -> tuple[str | None, str | None]:
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        return None, f"{file}:{line}: not UTF-8 text (byte {data[e.start]:#04x})"


def _read_all(directory: str | None, files: list[str] | None) -> tuple[list[tuple[str, str]], list[str]]:
    """(file, text) of every policy file, and the errors of those that cannot be read or are not trusted."""
    texts, errors = [], []

    def read(d: safefs.CheckedDir, name: str, file: str) -> None:
        try:
            text, error = _decode(file, d.read(name, shown=file))
        except PolicyError as e:
            text, error = None, str(e)
        except MemoryError:
            text, error = None, f"{file}: too large to read (out of memory)"
        if error is not None:
            errors.append(error)
        else:
            texts.append((file, text))

    if files is None:
        directory = policy_dir(directory)
        with _open_policy_dir(directory) as d:
            for name in _policy_names(d):
                read(d, name, os.path.join(directory, name))
        return texts, errors
    for file in files:
        try:
            d = _open_file_dir(file)
        except PolicyError as e:
            errors.append(str(e))
            continue
        with d:
            read(d, os.path.basename(file), file)
    return texts, errors


def check_policy(directory: str | None = None, files: list[str] | None = None) -> tuple[Policy | None, list[str]]:
    """The policy and every error found (`FILE:LINE: message`); the policy is None when there are errors."""
    try:
        texts, errors = _read_all(directory, files)
    except PolicyError as e:
        return None, e.errors
    entries, seen = [], {}
    for file, text in texts:
        result = check_document(file, text)
        entries += result.entries
        errors += result.errors
        for name, line in result.defined:
            where = f"{file}:{line}"
            first = seen.setdefault(name, where)
            if first != where:
                errors.append(f"{where}: {show_path(('units', name))}: {name} is already defined at {first}")
    return (None, errors) if errors else (Policy(entries), [])


def load_policy(directory: str | None = None, files: list[str] | None = None) -> Policy:
    """The policy; PolicyError (the first error, all of them in .errors) if anything is wrong.
    Only reads files and checks expressions: never touches the kernel."""
    policy, errors = check_policy(directory, files)
    if errors:
        more = f" (and {len(errors) - 1} more: bpfwall policy check lists them)" if len(errors) > 1 else ""
        raise PolicyError(errors[0] + more, errors)
    return policy
