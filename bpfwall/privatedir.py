"""A directory only bpfwall may change, held open by fd: where the watcher and the nft
backend keep their state files and locks.

Whoever can write a state file decides what bpfwall restores and reuses, so the
directory must be the euid's (root's) and mode 0700 — created so when missing,
refused when it is a symlink, someone else's, or open to group or others — and
every directory above it must be root's (or the euid's) and not writable by
others (a sticky /tmp is fine: nobody can move our entries there). Files are
opened through the checked directory's fd with O_NOFOLLOW, and a file is
replaced by writing a temporary file of an unpredictable name (O_EXCL) and
renaming it over the old one; the temporary file is removed if anything fails.
"""
from __future__ import annotations

import errno
import os
import secrets
import stat

TEMP_SUFFIX = ".tmp"


def _owners() -> tuple[int, ...]:
    return (0, os.geteuid())


def _describe_mode(mode: int) -> str:
    return f"{stat.S_IMODE(mode):04o}"


class PrivateDir:
    """`path`, checked and open. `what` names it in errors ("the nft state directory");
    `error` is the bpfwall.errors.Error subclass errors are raised as."""

    def __init__(self, path: str, what: str, error: type[Exception]):
        self.path, self.what, self.error = path, what, error
        self.fd = self._open()

    def __enter__(self) -> "PrivateDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def fail(self, problem: str, fix: str) -> Exception:
        return self.error(f"{self.what} {self.path} {problem}: {fix}")

    # -- the directory -------------------------------------------------------------------

    def _open(self) -> int:
        """Walk from / to the directory through dir fds (no symlink followed), creating what is
        missing with mode 0700, checking every component; the directory's fd."""
        absolute = os.path.abspath(self.path)
        parent = os.path.realpath(os.path.dirname(absolute))  # the parents' own symlinks (/var/run) are theirs
        parts = [p for p in parent.split("/") if p] + [os.path.basename(absolute)]
        fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        where = "/"
        try:
            for i, name in enumerate(parts):
                last = i == len(parts) - 1
                where = os.path.join(where, name)
                child = self._open_child(fd, name, where, last)
                os.close(fd)
                fd = child
                st = os.fstat(fd)
                if last:
                    self._check_own(st)
                else:
                    self._check_parent(st, where)
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _open_child(self, parent_fd: int, name: str, where: str, last: bool) -> int:
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        for _ in range(2):
            try:
                return os.open(name, flags, dir_fd=parent_fd)
            except FileNotFoundError:
                try:
                    os.mkdir(name, 0o700, dir_fd=parent_fd)
                except FileExistsError:
                    pass  # made meanwhile: open and check it like any other
                except OSError as e:
                    raise self.fail(f"cannot be created ({where}: {e.strerror})",
                                    "bpfwall needs root" if os.geteuid() != 0 else "check the path") from None
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    if last:
                        raise self.fail("is a symbolic link or not a directory",
                                        "remove it and let bpfwall create the directory") from None
                    raise self.fail(f"is below {where}, which is a symbolic link or not a directory",
                                    "use a path of real directories") from None
                raise self.fail(f"cannot be opened ({where}: {e.strerror})",
                                "bpfwall needs root" if os.geteuid() != 0 else "check the path") from None
        raise self.fail(f"keeps disappearing ({where})", "check what removes it")

    def _check_own(self, st: os.stat_result) -> None:
        if st.st_uid not in _owners():
            raise self.fail(f"is owned by uid {st.st_uid}, not root",
                            f"remove it (rm -r {self.path}) and let bpfwall create it")
        if st.st_mode & 0o077:
            raise self.fail(f"is accessible by group or others (mode {_describe_mode(st.st_mode)})",
                            f"run chmod 700 {self.path}")

    def _check_parent(self, st: os.stat_result, where: str) -> None:
        if st.st_uid not in _owners():
            raise self.fail(f"is below {where}, which is owned by uid {st.st_uid}, not root",
                            "keep state directories below directories only root can change")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise self.fail(f"is below {where}, which others may change (mode {_describe_mode(st.st_mode)})",
                            f"run chmod go-w {where}, or keep state elsewhere")

    # -- files in it ---------------------------------------------------------------------

    def _checked_file(self, fd: int, name: str) -> int:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid not in _owners() or st.st_mode & 0o022:
            os.close(fd)
            raise self.fail(f"holds {name}, which is not a regular file of root's writable only by root",
                            f"remove {os.path.join(self.path, name)}")
        return fd

    def open_lock(self, name: str) -> int:
        """The fd of lock file `name` (created 0600 when missing, never through a symlink)."""
        try:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                         0o600, dir_fd=self.fd)
        except OSError as e:
            raise self.error(f"cannot open {os.path.join(self.path, name)}: {e.strerror}") from None
        return self._checked_file(fd, name)

    def read(self, name: str) -> bytes | None:
        """The contents of file `name`, None when there is none."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=self.fd)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise self.error(f"cannot read {os.path.join(self.path, name)}: {e.strerror}") from None
        fd = self._checked_file(fd, name)
        try:
            with os.fdopen(fd, "rb", closefd=False) as f:
                return f.read()
        except OSError as e:
            raise self.error(f"cannot read {os.path.join(self.path, name)}: {e.strerror}") from None
        finally:
            os.close(fd)

    def stat(self, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def replace(self, name: str, data: bytes) -> None:
        """Make `name` hold `data`: readers see the old contents or the new, never a mix; on any
        failure (a full disk) the old file stays and no temporary file is left."""
        temp = self.stage(name, data)
        self.commit(temp, name)

    def stage(self, name: str, data: bytes) -> str:
        """Write `data` to a new temporary file (for commit() or discard()); its name."""
        temp = f".{name}.{secrets.token_hex(8)}{TEMP_SUFFIX}"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=self.fd)
        except OSError as e:
            raise self.error(f"cannot write {os.path.join(self.path, name)}: {e.strerror}") from None
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            # No fsync: state lives on tmpfs (/run) and means nothing after a reboot; the rename
            # alone gives readers the old contents or the new.
        except OSError as e:
            os.close(fd)
            self.discard(temp)
            raise self.error(f"cannot write {os.path.join(self.path, name)}: {e.strerror}") from None
        except BaseException:
            os.close(fd)
            self.discard(temp)
            raise
        os.close(fd)
        return temp

    def commit(self, temp: str, name: str) -> None:
        try:
            os.replace(temp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except OSError as e:
            self.discard(temp)
            raise self.error(f"cannot write {os.path.join(self.path, name)}: {e.strerror}") from None

    def discard(self, temp: str) -> None:
        try:
            os.unlink(temp, dir_fd=self.fd)
        except FileNotFoundError:
            pass

    def unlink(self, name: str) -> None:
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise self.error(f"cannot remove {os.path.join(self.path, name)}: {e.strerror}") from None

    def remove_temps(self, name: str) -> list[str]:
        """Remove the temporary files a killed writer of `name` left (call with `name`'s lock
        held: no live writer then); their names."""
        prefix = f".{name}."
        gone = [e for e in os.listdir(self.fd) if e.startswith(prefix) and e.endswith(TEMP_SUFFIX)]
        for temp in gone:
            self.discard(temp)
        return gone
