"""Finding and reading the policy files: a directory of *.toml, or files named explicitly."""
from __future__ import annotations

import os

from .entry import PolicyError
from .match import Policy
from .schema import check_document, show_path

DEFAULT_POLICY_DIR = "/etc/bpfwall"


def policy_dir(directory: str | None = None) -> str:
    """--policy-dir, else $BPFWALL_POLICY_DIR, else /etc/bpfwall."""
    return directory or os.environ.get("BPFWALL_POLICY_DIR") or DEFAULT_POLICY_DIR


def policy_files(directory: str | None = None) -> list[str]:
    """Every *.toml in the directory, sorted by name; dotfiles (editor locks and temporaries) are skipped."""
    directory = policy_dir(directory)
    try:
        names = os.listdir(directory)
    except OSError as e:
        raise PolicyError(f"{directory}: cannot read the policy directory: {e.strerror}") from None
    return [os.path.join(directory, n) for n in sorted(names)
            if n.endswith(".toml") and not n.startswith(".") and os.path.isfile(os.path.join(directory, n))]


def _read(file: str) -> tuple[str | None, str | None]:
    try:
        with open(file, "rb") as f:
            data = f.read()
    except OSError as e:
        return None, f"{file}: cannot read: {e.strerror}"
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        return None, f"{file}:{line}: not UTF-8 text (byte {data[e.start]:#04x})"


def check_policy(directory: str | None = None, files: list[str] | None = None) -> tuple[Policy | None, list[str]]:
    """The policy and every error found (`FILE:LINE: message`); the policy is None when there are errors."""
    if files is None:
        try:
            files = policy_files(directory)
        except PolicyError as e:
            return None, e.errors
    entries, errors, seen = [], [], {}
    for file in files:
        text, error = _read(file)
        if error is not None:
            errors.append(error)
            continue
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
