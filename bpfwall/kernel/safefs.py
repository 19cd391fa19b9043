"""Directories and files nobody else could have planted or changed, reached without a check-then-use race.

Whoever controls a directory on a path can swap what lies below it, so a path is walked
from / one component at a time: each directory is opened with O_NOFOLLOW relative to the
last one's fd and checked with fstat on the fd that is then used. A directory is trusted
when it is owned by root or the euid and not writable by group or others; the rules of a
use (`Rules`) say what may differ *above* the directory bpfwall trusts (a sticky directory
like /tmp, which others may add to but not rename our entries in; symbolic links like
/var/run → /run, resolved and what they lead to checked), whether the directory is made
when missing and whether it must be private (0700). Files are opened relative to the
checked directory's fd with O_NOFOLLOW and fstat-checked the same way; a file is replaced
by writing a temporary file of an unpredictable name (O_EXCL), then renaming it over the
old one through the same fd, the temporary file removed if anything fails.

Every refusal is one line naming the path, what is wrong and the fix:
`SUBJECT: refused: the policy directory /x is writable by group (mode 0775); fix: chmod go-w /x`.
"""
from __future__ import annotations

import dataclasses
import errno
import os
import pwd
import secrets
import stat
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

from ..errors import UserError
from .fd import Fd

TEMP_SUFFIX = ".tmp"
_DIR_FLAGS = os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_WRITABLE = stat.S_IWGRP | stat.S_IWOTH
_ACCESSIBLE = 0o077


@dataclass(frozen=True)
class Rules:
    """How one use walks its paths, and how its messages name things."""
    what: str                       # the directory, as messages call it: "the policy directory"
    elsewhere: str                  # the fix when a directory above it is at fault: "keep … in /etc/bpfwall"
    file_what: str = "the file"     # a file in it: "the policy file"
    ours: bool = True               # bpfwall makes it: what someone else made there is removed, not adopted
    sticky_above: bool = True       # a sticky directory others may write (like /tmp) may lie above it
    resolve_above: bool = False     # symbolic links above it are resolved and what they lead to checked
    private: bool = False           # the directory itself must give group and others no access (0700)
    create_mode: int = 0o700        # for directories made where missing
    durable: bool = True            # fsync a file before it replaces the old one
    prevent: str = ""               # how to stop others planting things there again
    name_option: str = "{0}"        # how to name a linked directory's target instead ("--policy-dir {0}")
    needs_root: bool = False        # say so when permission is denied to another user
    before_mkdir: Callable[[int, str, str], None] | None = None  # (parent fd, name, path): may refuse


class PathError(UserError):
    """A path that cannot be used; str() is one line naming it. `errno` says why (ENOENT: missing)."""

    def __init__(self, err: int, message: str, path: str):
        super().__init__(message)
        self.errno, self.path = err, path


class UnsafePath(PathError):
    """A directory or file someone other than root (or the euid) could have planted or changed.
    `problem` ("is owned by …") and `fix` are the parts of the message."""

    def __init__(self, err: int, subject: str, path: str, it: str, problem: str, fix: str):
        super().__init__(err, f"{show(subject)}: refused: {it} {problem}; fix: {fix}", path)
        self.problem, self.fix = problem, fix


def show(path: str) -> str:
    """A path for a one-line message: control characters (a newline in a name) escaped."""
    return path if path.isprintable() else path.encode("unicode_escape", "backslashreplace").decode("ascii")


# -- walking to a directory --------------------------------------------------------------------

def open_dir(path: str, rules: Rules, *, create: bool = False, trusted_from: str | None = None,
             listing: bool = True, subject: str | None = None) -> int:
    """An fd on directory `path` (O_RDONLY to list it, else O_PATH), every directory from / to it
    opened without following links and checked; missing ones made if `create`.

    Directories from `trusted_from` (default: `path`) down are held to the strict rule; those above
    it may be sticky and world-writable if the rules allow. `subject` is what messages are about
    (default `path`; a file when the directory is opened to read it). PathError (UnsafePath: refused).
    """
    subject = subject if subject is not None else path
    parent, name = os.path.split(os.path.abspath(path))
    if rules.resolve_above:
        parent = os.path.realpath(parent)
    chain = [c for c in parent.split("/") if c] + ([name] if name else [])
    target = "/" + "/".join(chain)
    strict_from = os.path.abspath(trusted_from) if trusted_from else target
    access = os.O_RDONLY if listing and not chain else os.O_PATH
    fd = os.open("/", access | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _check_dir(os.fstat(fd), "/", rules, subject, last=not chain, strict=not chain)
        where = ""
        for depth, component in enumerate(chain, 1):
            where += "/" + component
            last = depth == len(chain)
            strict = where == strict_from or where.startswith(strict_from + "/")
            child = _open_child(fd, component, where, rules, subject, last, strict, create,
                                os.O_RDONLY if last and listing else os.O_PATH)
            os.close(fd)
            fd = child
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_subdir(dir_fd: int, name: str, path: str, rules: Rules, create: bool = False) -> int:
    """An fd on the directory `name` in the checked directory `dir_fd` (its path: `path`), held to
    the strict rule: it lies in a directory we trust."""
    return _open_child(dir_fd, name, path, rules, path, True, True, create, os.O_RDONLY)


def _open_child(parent: int, name: str, where: str, rules: Rules, subject: str, last: bool, strict: bool,
                create: bool, access: int) -> int:
    try:
        fd = os.open(name, access | _DIR_FLAGS, dir_fd=parent)
    except FileNotFoundError as e:
        if not create:
            raise _failed(e, "open", where, rules, subject, last) from None
        if rules.before_mkdir is not None:
            rules.before_mkdir(parent, name, where)
        try:
            os.mkdir(name, rules.create_mode, dir_fd=parent)
        except FileExistsError:
            pass  # made meanwhile: opened and checked like any other
        except OSError as e:
            raise _failed(e, "create", where, rules, subject, last) from None
        return _open_child(parent, name, where, rules, subject, last, strict, False, access)
    except OSError as e:
        if e.errno in (errno.ENOTDIR, errno.ELOOP) and _is_link(parent, name):  # O_NOFOLLOW says ENOTDIR
            raise _link_refused(where, rules, subject, last, strict) from None
        raise _failed(e, "open", where, rules, subject, last) from None
    try:
        _check_dir(os.fstat(fd), where, rules, subject, last, strict)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _is_link(parent: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _it(where: str, rules: Rules, last: bool) -> str:
    return f"{rules.what} {show(where)}" if last else f"{show(where)}, a directory above it"


def _check_dir(st: os.stat_result, where: str, rules: Rules, subject: str, last: bool, strict: bool) -> None:
    private = rules.private and strict
    sticky_ok = rules.sticky_above and not strict and st.st_mode & stat.S_ISVTX
    refused = _ACCESSIBLE if private else 0 if sticky_ok else _WRITABLE
    _check(st, where, rules, subject, _it(where, rules, last) + ("" if last else ","), strict, refused, "rm -r")


def _check(st: os.stat_result, where: str, rules: Rules, subject: str, it: str, strict: bool, refused: int,
           rm: str) -> None:
    """UnsafePath unless `st` is root's (or the euid's) and has none of the `refused` mode bits."""
    foreign = st.st_uid not in (0, os.geteuid())
    exposed = st.st_mode & refused
    if not foreign and not exposed:
        return
    p = show(where)
    problems = ([_owned(st.st_uid)] if foreign else []) + ([_exposed(st.st_mode, refused)] if exposed else [])
    chmod = f"chmod {'700' if refused == _ACCESSIBLE else 'go-w'} {p}"
    if exposed and stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX and st.st_mode & stat.S_IWOTH:
        problems[-1] = problems[-1][:-1] + ", shared like /tmp)"
        fix = rules.elsewhere  # its owner means it to be open to all: ours belongs elsewhere
    elif not strict:  # not ours: handing it to root may break its owner
        fix = rules.elsewhere if foreign else f"{chmod}, or {rules.elsewhere}"
    elif foreign and rules.ours:
        fix = f"{rm} {p}"  # someone else's, where bpfwall makes its own: bpfwall makes it again
    else:
        fix = " && ".join(([f"chown root:root {p}"] if foreign else []) + ([chmod] if exposed else []))
    if foreign and rules.prevent:
        fix += f", and {rules.prevent}"
    raise UnsafePath(errno.EPERM, subject, where, it, "is " + " and ".join(problems), fix)


def _link_refused(where: str, rules: Rules, subject: str, last: bool, strict: bool) -> UnsafePath:
    real = show(os.path.realpath(where))  # only to say where it leads
    if not strict:
        fix = f"name a path without symbolic links ({show(os.path.realpath(subject))})"
    elif rules.ours:
        fix = f"rm {show(where)}"
    else:
        fix = f"name the directory itself ({rules.name_option.format(real)})"
    it = _it(where, rules, last) + ("" if last else ",")
    return UnsafePath(errno.ELOOP, subject, where, it, f"is a symbolic link (to {real})", fix)


def _owned(uid: int) -> str:
    euid = os.geteuid()
    return f"owned by {_user(uid)}, not root" + (f" or {_user(euid)}" if euid else "")


def _exposed(mode: int, refused: int) -> str:
    """"writable by group and others (mode 0777)", or where any access is refused "accessible by …"."""
    if refused == _ACCESSIBLE:
        bits, how = ((0o070, "group"), (0o007, "others")), "accessible"
    else:
        bits, how = ((stat.S_IWGRP, "group"), (stat.S_IWOTH, "others")), "writable"
    who = " and ".join(w for bit, w in bits if mode & bit)
    return f"{how} by {who} (mode {stat.S_IMODE(mode):04o})"


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _failed(e: OSError, verb: str, where: str, rules: Rules, subject: str, last: bool = True,
            it: str | None = None) -> PathError:
    hint = " (bpfwall needs root)" if (rules.needs_root and os.geteuid() != 0
                                       and e.errno in (errno.EACCES, errno.EPERM)) else ""
    it = it if it is not None else _it(where, rules, last)
    return PathError(e.errno, f"{show(subject)}: cannot {verb} {it}: {e.strerror}{hint}", where)


# -- files in a checked directory ----------------------------------------------------------------

def check_file(st: os.stat_result, path: str, rules: Rules) -> None:
    """UnsafePath unless `st` (fstat of a file, or lstat of an entry such as a pin) is a regular
    file of root's (or the euid's) that group and others cannot write."""
    p = show(path)
    if stat.S_ISLNK(st.st_mode):
        raise _file_link(path, os.path.realpath(path), rules)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePath(errno.EINVAL, path, path, rules.file_what, "is not a regular file",
                         f"rm {p}" if rules.ours else "replace it with a regular file")
    _check(st, path, rules, path, rules.file_what, True, _WRITABLE, "rm")


def _file_link(path: str, target: str, rules: Rules) -> UnsafePath:
    p, t = show(path), show(target)
    fix = f"rm {p}" if rules.ours else f"replace it with a root-owned copy you have checked: cp --remove-destination {t} {p}"
    return UnsafePath(errno.ELOOP, path, path, rules.file_what,
                      f"is a symbolic link (to {t}), which lets whoever owns the target change it", fix)


def open_file(dir_fd: int, name: str, path: str, rules: Rules, flags: int = os.O_RDONLY,
              create_mode: int | None = None) -> int:
    """The fd of file `name` in the checked directory `dir_fd` (`path` in messages), never through a
    symbolic link, checked (check_file); made with `create_mode` when missing, if given."""
    if create_mode is not None:
        flags |= os.O_CREAT
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, create_mode or 0, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _file_link(path, _link_target(dir_fd, name, path), rules) from None
        raise _failed(e, "open", path, rules, path, it=rules.file_what) from None
    try:
        check_file(os.fstat(fd), path, rules)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _link_target(dir_fd: int, name: str, path: str) -> str:
    try:
        target = os.readlink(name, dir_fd=dir_fd)
    except OSError:
        return "?"
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), target))


def read_file(dir_fd: int, name: str, path: str, rules: Rules, limit: int | None = None) -> bytes:
    """The bytes of the checked file `name` (open_file); PathError (errno EFBIG) beyond `limit` bytes."""
    fd = open_file(dir_fd, name, path, rules)
    try:
        chunks, size = [], 0
        while chunk := os.read(fd, 1 << 20 if limit is None else min(1 << 20, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if limit is not None and size > limit:
                raise PathError(errno.EFBIG, f"{show(path)}: cannot read {rules.file_what}: larger than "
                                             f"{limit} bytes", path)
        return b"".join(chunks)
    except OSError as e:
        raise _failed(e, "read", path, rules, path, it=rules.file_what) from None
    finally:
        os.close(fd)


# -- replacing a file atomically -------------------------------------------------------------------

def stage(dir_fd: int, name: str, data: bytes, path: str, rules: Rules) -> str:
    """Write `data` to a new temporary file of an unpredictable name next to `name` (for commit()
    or discard()); its name. Nothing is left behind on failure."""
    temp = f".{name}.{secrets.token_hex(8)}{TEMP_SUFFIX}"
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=dir_fd)
    except OSError as e:
        raise _failed(e, "write", path, rules, path, it=rules.file_what) from None
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if rules.durable:
                os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException as e:
        discard(dir_fd, temp)
        if isinstance(e, OSError):
            raise _failed(e, "write", path, rules, path, it=rules.file_what) from None
        raise
    return temp


def commit(dir_fd: int, temp: str, name: str, path: str, rules: Rules) -> None:
    """Rename `temp` over `name`: readers see the old file or the new one, never a mix; `temp` is
    removed if that fails."""
    try:
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError as e:
        discard(dir_fd, temp)
        raise _failed(e, "write", path, rules, path, it=rules.file_what) from None


def discard(dir_fd: int, temp: str) -> None:
    try:
        os.unlink(temp, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def write_file(dir_fd: int, name: str, data: bytes, path: str, rules: Rules) -> None:
    """Make `name` hold `data` atomically (stage, then commit); on any failure (a full disk) the
    old file stays and no temporary file is left."""
    commit(dir_fd, stage(dir_fd, name, data, path, rules), name, path, rules)


def remove_temps(dir_fd: int, name: str) -> list[str]:
    """Remove the temporary files a killed writer of `name` left (call with `name`'s lock held:
    no live writer then); their names."""
    prefix = f".{name}."
    gone = [e for e in os.listdir(dir_fd) if e.startswith(prefix) and e.endswith(TEMP_SUFFIX)]
    for temp in gone:
        discard(dir_fd, temp)
    return gone


# -- a checked directory, held open ------------------------------------------------------------------

class CheckedDir(Fd):
    """An open, checked directory (an Fd: closed by close() or leaving a `with` block);
    everything in it is reached relative to its fd.

    `error`, when given, turns a PathError into the caller's own error class (a layer's
    UserError, the kernel layer's KernelError)."""

    def __init__(self, fd: int, path: str, rules: Rules,
                 error: Callable[[PathError], Exception] | None = None):
        super().__init__(fd)
        self.path, self.rules, self.error = path, rules, error

    @property
    def fd(self) -> int:
        return self.fileno()

    @classmethod
    def open(cls, path: str, rules: Rules, *, create: bool = False, trusted_from: str | None = None,
             listing: bool = True, subject: str | None = None,
             error: Callable[[PathError], Exception] | None = None) -> "CheckedDir":
        """`path`, walked and checked (see open_dir)."""
        fd = cls._walk(path, rules, error, create=create, trusted_from=trusted_from, listing=listing,
                       subject=subject)
        return cls(fd, path, rules, error)

    @staticmethod
    def _walk(path: str, rules: Rules, error: Callable[[PathError], Exception] | None, **how) -> int:
        try:
            return open_dir(path, rules, **how)
        except PathError as e:
            if error is None:
                raise
            raise error(e) from None

    @contextmanager
    def _errors(self):
        try:
            yield
        except PathError as e:
            if self.error is None:
                raise
            raise self.error(e) from None

    def sub(self, name: str, create: bool = False) -> "CheckedDir":
        """The checked subdirectory `name`, of the same class and rules."""
        full = os.path.join(self.path, name)
        with self._errors():
            fd = open_subdir(self.fd, name, full, self.rules, create)
        child = object.__new__(type(self))
        CheckedDir.__init__(child, fd, full, self.rules, self.error)
        return child

    # -- entries ----------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(os.listdir(self.fd))

    def lstat(self, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def exists(self, name: str) -> bool:
        return self.lstat(name) is not None

    def is_dir(self, name: str) -> bool:
        st = self.lstat(name)
        return st is not None and stat.S_ISDIR(st.st_mode)

    def _path(self, name: str, shown: str | None = None) -> str:
        return shown if shown is not None else os.path.join(self.path, name)

    def open_file(self, name: str, flags: int = os.O_RDONLY, create_mode: int | None = None) -> int:
        """The checked fd of file `name` (see open_file)."""
        with self._errors():
            return open_file(self.fd, name, self._path(name), self.rules, flags, create_mode)

    def read(self, name: str, limit: int | None = None, shown: str | None = None,
             missing_ok: bool = False) -> bytes | None:
        """The bytes of the checked file `name` (`shown` names it in messages); None when it does
        not exist and `missing_ok`."""
        with self._errors():
            try:
                return read_file(self.fd, name, self._path(name, shown), self.rules, limit)
            except PathError as e:
                if missing_ok and e.errno == errno.ENOENT:
                    return None
                raise

    def write(self, name: str, data: bytes) -> None:
        """Make `name` hold `data`, atomically (see write_file)."""
        with self._errors():
            write_file(self.fd, name, data, self._path(name), self.rules)

    def stage(self, name: str, data: bytes) -> str:
        with self._errors():
            return stage(self.fd, name, data, self._path(name), self.rules)

    def commit(self, temp: str, name: str) -> None:
        with self._errors():
            commit(self.fd, temp, name, self._path(name), self.rules)

    def discard(self, temp: str) -> None:
        discard(self.fd, temp)

    def remove_temps(self, name: str) -> list[str]:
        return remove_temps(self.fd, name)

    def unlink(self, name: str) -> bool:
        """Remove the file `name`; False when there was none."""
        return self._remove(os.unlink, name, self.rules.file_what)

    def rmdir(self, name: str) -> bool:
        """Remove the empty directory `name`; False when there was none."""
        return self._remove(os.rmdir, name, _it(self._path(name), self.rules, True))

    def _remove(self, remove: Callable[..., None], name: str, it: str) -> bool:
        try:
            remove(name, dir_fd=self.fd)
        except FileNotFoundError:
            return False
        except OSError as e:
            with self._errors():
                raise _failed(e, "remove", self._path(name), self.rules, self._path(name), it=it) from None
        return True


# -- a private state directory --------------------------------------------------------------------

PRIVATE = Rules(what="the state directory", file_what="the state file", private=True, resolve_above=True,
                durable=False,  # state lives on tmpfs (/run) and means nothing after a reboot
                elsewhere="keep state below directories only root can change", needs_root=True)


class PrivateDir(CheckedDir):
    """A directory only bpfwall may change (mode 0700, made so when missing), where the watcher and
    the nft backend keep their state files and locks: whoever can write a state file decides what
    bpfwall restores. `what` names it in errors ("the nft state directory"); `error` is the
    UserError subclass errors are raised as."""

    def __init__(self, path: str, what: str, error: type[Exception]):
        rules = dataclasses.replace(PRIVATE, what=what)

        def convert(e: PathError) -> Exception:
            return error(str(e))
        super().__init__(self._walk(path, rules, convert, create=True), path, rules, convert)

    def open_lock(self, name: str) -> int:
        """The fd of lock file `name` (made 0600 when missing, never through a symlink)."""
        return self.open_file(name, os.O_RDWR, create_mode=0o600)

    def read(self, name: str) -> bytes | None:
        """The contents of file `name`, None when there is none."""
        return super().read(name, missing_ok=True)

    replace = CheckedDir.write  # the name the watcher's state uses
