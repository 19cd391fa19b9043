"""Finding and reading the policy files: a directory of *.toml, or files named explicitly;
only from places nobody but root (or the euid) can write (trust.py)."""
from __future__ import annotations

import os

from .entry import PolicyError
from .match import Policy
from .schema import check_document, show_path
from .trust import open_trusted_dir, read_trusted_file, trusted_names

DEFAULT_POLICY_DIR = "/etc/bpfwall"


def policy_dir(directory: str | None = None) -> str:
    """--policy-dir, else $BPFWALL_POLICY_DIR, else /etc/bpfwall."""
    return directory or os.environ.get("BPFWALL_POLICY_DIR") or DEFAULT_POLICY_DIR


def policy_files(directory: str | None = None) -> list[str]:
    """Every *.toml in the directory, sorted by name; dotfiles (editor locks and temporaries) are
    skipped. PolicyError if the directory is not one bpfwall trusts (see trust.py)."""
    directory = policy_dir(directory)
    fd = open_trusted_dir(directory)
    try:
        return [os.path.join(directory, n) for n in _policy_names(fd)]
    finally:
        os.close(fd)


def _policy_names(dir_fd: int) -> list[str]:
    # Anything else named *.toml is read, and refused unless it is a regular file (a symlink too).
    return [n for n in trusted_names(dir_fd) if n.endswith(".toml") and not n.startswith(".")]


def _decode(file: str, data: bytes) -> tuple[str | None, str | None]:
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        return None, f"{file}:{line}: not UTF-8 text (byte {data[e.start]:#04x})"


def _read_all(directory: str | None, files: list[str] | None) -> tuple[list[tuple[str, str]], list[str]]:
    """(file, text) of every policy file, and the errors of those that cannot be read or are not trusted."""
    texts, errors = [], []

    def read(dir_fd: int, name: str, file: str) -> None:
        try:
            text, error = _decode(file, read_trusted_file(dir_fd, name, file))
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
        fd = open_trusted_dir(directory)
        try:
            for name in _policy_names(fd):
                read(fd, name, os.path.join(directory, name))
        finally:
            os.close(fd)
        return texts, errors
    for file in files:
        parent, name = os.path.split(file)
        try:  # the file's directory may be reached through a link; the file itself may not be one
            fd = open_trusted_dir(os.path.realpath(parent or "."), listing=False, file=file)
        except PolicyError as e:
            errors.append(str(e))
            continue
        try:
            read(fd, name, file)
        finally:
            os.close(fd)
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
