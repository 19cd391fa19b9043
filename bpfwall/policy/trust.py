"""Reading policy files only from where nobody but root (or the euid) could have written them.

The policy decides what every unit may send and receive, so, as sshd's StrictModes does
for authorized_keys, a policy file is refused unless

* it is a regular file, not a symbolic link;
* it is owned by root (or by the user bpfwall runs as) and not writable by group or others
  (an ACL granting write shows in the group bits as its mask, so it is refused too);
* the same holds for its directory and for every directory above it up to `/`.

A sticky world-writable directory such as /tmp is refused above a policy as well, like sshd
does: anyone may create names in it, so a policy kept there can be squatted or swapped by
whoever gets to a name first; policy belongs under a root-only path like /etc/bpfwall.
Symbolic links ABOVE the policy directory (say /var/run → /run) are resolved first and every
directory they lead to is checked; the policy directory itself and the files in it must not
be links.

Everything is opened from `/` down through directory fds, one component at a time with
O_NOFOLLOW, and checked with fstat on the fd that is then used: no path is looked up twice,
so nothing can be swapped between the check and the read.
"""
from __future__ import annotations

import errno
import os
import pwd
import stat
from dataclasses import dataclass

from .entry import PolicyError

_DIR_FLAGS = os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH


def show(path: str) -> str:
    """A path for a one-line message: control characters (a newline in a name) escaped."""
    return path if path.isprintable() else path.encode("unicode_escape", "backslashreplace").decode("ascii")


@dataclass(frozen=True)
class _Target:
    """What a directory is opened for, as the messages name it."""
    shown: str      # the policy directory, or the file to be read from it
    final: str      # how the last directory is called: "the policy directory" or "its directory"
    cannot: str     # how a failure to open is said


def open_trusted_dir(path: str, listing: bool = True, file: str | None = None) -> int:
    """An fd of the directory `path` (O_RDONLY to list it, else O_PATH), every directory from `/`
    to it checked; PolicyError naming the directory (or `file`, when it is opened to read that
    one file), what is wrong and the fix."""
    target = (_Target(show(path), "the policy directory", "cannot read the policy directory") if file is None
              else _Target(show(file), "its directory", "cannot read"))
    parent, name = os.path.split(os.path.abspath(path))
    if name in ("", ".", ".."):
        parent, name = os.path.split(os.path.realpath(path))
    chain = [c for c in os.path.realpath(parent).split("/") if c] + ([name] if name else [])
    fd = os.open("/", (os.O_RDONLY if listing and not chain else os.O_PATH) | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _check_dir(fd, "/", target, last=not chain)
        for depth, component in enumerate(chain, 1):
            last = depth == len(chain)
            where = "/" + "/".join(chain[:depth])
            mode = os.O_RDONLY if last and listing else os.O_PATH
            try:
                child = os.open(component, mode | _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                raise PolicyError(_open_failed(fd, component, e, where, target, last)) from None
            os.close(fd)
            fd = child
            _check_dir(fd, where, target, last)
        return fd
    except BaseException:
        os.close(fd)
        raise


def read_trusted_file(dir_fd: int, name: str, shown: str) -> bytes:
    """The bytes of `name` in the checked directory `dir_fd`; PolicyError if it is a symbolic link,
    not a regular file, or owned or writable by someone else."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            target = _readlink(dir_fd, name)
            raise PolicyError(f"{show(shown)}: refused: the policy file is a symbolic link (to {show(target)}), "
                              "which lets whoever owns the target write the policy; fix: replace it with a "
                              f"root-owned copy you have checked: cp --remove-destination {show(target)} "
                              f"{show(shown)}") from None
        raise PolicyError(f"{show(shown)}: cannot read: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise PolicyError(f"{show(shown)}: refused: not a regular file")
        problems, fixes = _problems(st, show(shown))
        if problems:
            raise PolicyError(f"{show(shown)}: refused: the policy file is {' and '.join(problems)}; "
                              f"fix: {' && '.join(fixes)}")
        try:
            return f.read()
        except OSError as e:
            raise PolicyError(f"{show(shown)}: cannot read: {e.strerror}") from None


def trusted_names(dir_fd: int) -> list[str]:
    """The names in a checked directory that are not directories, sorted."""
    out = []
    for name in sorted(os.listdir(dir_fd)):
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:  # removed while listing
            continue
        if not stat.S_ISDIR(st.st_mode):
            out.append(name)
    return out


def _check_dir(fd: int, where: str, target: _Target, last: bool) -> None:
    st = os.fstat(fd)
    it = f"{target.final} {show(where)}" if last else f"{show(where)}, a directory above it,"
    if not stat.S_ISDIR(st.st_mode):  # O_PATH opens whatever is there
        raise PolicyError(f"{target.shown}: {target.cannot}: {show(where)} is not a directory")
    problems, fixes = _problems(st, show(where))
    if not problems:
        return
    from .load import DEFAULT_POLICY_DIR

    elsewhere = f"keep policy files where only root can write, e.g. in {DEFAULT_POLICY_DIR}"
    fix = " && ".join(fixes)
    if st.st_mode & stat.S_ISVTX and st.st_mode & stat.S_IWOTH:
        problems[-1] = problems[-1][:-1] + ", shared like /tmp)"
        fix = elsewhere
    elif not last:  # a directory above the policy is not the policy's: handing it to root may break its owner
        chmod = [f for f in fixes if f.startswith("chmod")]
        fix = f"{chmod[0]}, or {elsewhere}" if chmod else elsewhere
    raise PolicyError(f"{target.shown}: refused: {it} is {' and '.join(problems)}; fix: {fix}")


def _problems(st: os.stat_result, shown: str) -> tuple[list[str], list[str]]:
    """What is wrong with the owner and mode of a file or directory, and the commands that fix it."""
    problems, fixes = [], []
    euid = os.geteuid()
    if st.st_uid not in (0, euid):
        problems.append(f"owned by {_user(st.st_uid)}, not root" + (f" or {_user(euid)}" if euid else ""))
        fixes.append(f"chown root:root {shown}")
    if st.st_mode & _WRITABLE_BY_OTHERS:
        who = " and ".join(w for bit, w in ((stat.S_IWGRP, "group"), (stat.S_IWOTH, "others"))
                           if st.st_mode & bit)
        problems.append(f"writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})")
        fixes.append(f"chmod go-w {shown}")
    return problems, fixes


def _open_failed(fd: int, component: str, e: OSError, where: str, target: _Target, last: bool) -> str:
    if e.errno in (errno.ELOOP, errno.ENOTDIR):
        try:
            is_link = stat.S_ISLNK(os.stat(component, dir_fd=fd, follow_symlinks=False).st_mode)
        except OSError:
            is_link = False
        if is_link and last:
            real = show(os.path.realpath(where))
            return (f"{target.shown}: refused: {target.final} {show(where)} is a symbolic link (to {real}); "
                    f"fix: name the directory itself (--policy-dir {real} or BPFWALL_POLICY_DIR={real})")
        if is_link:  # swapped in after the path was resolved
            return f"{target.shown}: refused: {show(where)} above it turned into a symbolic link while it was read"
        return f"{target.shown}: {target.cannot}: {show(where)} is not a directory"
    return f"{target.shown}: {target.cannot}: {e.strerror}"


def _readlink(dir_fd: int, name: str) -> str:
    try:
        return os.readlink(name, dir_fd=dir_fd)
    except OSError:
        return "?"


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"

