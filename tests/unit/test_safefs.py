"""The checked-path module (bpfwall/kernel/safefs.py) on temporary directories, no root needed.

The cases about another user's files chown to uid 65534 and are skipped when not root. The
attacks by a real unprivileged user, through bpfwall's commands, are in the kernel tests of
each use (test_pin_security, test_build_cache, test_state_dir, test_policy_trust, test_run).
"""
from __future__ import annotations

import dataclasses
import errno
import os
import re
import stat

import pytest

from bpfwall.errors import UserError
from bpfwall.kernel import safefs

ROOT = os.geteuid() == 0
NOBODY = 65534
needs_root = pytest.mark.skipif(not ROOT, reason="chown to another user needs root")

# The rules of the uses differ in exactly these ways (see each use for its own).
STICKY_OK = safefs.Rules(what="the test directory", elsewhere="keep it elsewhere")
STRICT = dataclasses.replace(STICKY_OK, sticky_above=False, resolve_above=True, ours=False,
                             name_option="--dir {0}")
PRIVATE = dataclasses.replace(STICKY_OK, private=True)


def opened(path, rules=STICKY_OK, **how) -> None:
    os.close(safefs.open_dir(str(path), rules, **how))


def refusal(path, rules=STICKY_OK, **how) -> safefs.UnsafePath:
    with pytest.raises(safefs.UnsafePath) as info:
        opened(path, rules, **how)
    message = str(info.value)
    assert "\n" not in message and "; fix: " in message and isinstance(info.value, UserError)
    return info.value


def file_refusal(directory, name, rules=STICKY_OK) -> safefs.UnsafePath:
    """How reading `name` in `directory` (itself opened with STICKY_OK) is refused under `rules`."""
    fd = safefs.open_dir(str(directory), STICKY_OK)
    try:
        with pytest.raises(safefs.UnsafePath) as info:
            safefs.read_file(fd, name, f"{directory}/{name}", rules)
    finally:
        os.close(fd)
    assert "\n" not in str(info.value)
    return info.value


# -- symbolic links --------------------------------------------------------------------------------

def test_a_symlinked_directory_is_refused_never_followed(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    e = refusal(tmp_path / "link", create=True)
    assert str(e) == (f"{tmp_path}/link: refused: the test directory {tmp_path}/link is a symbolic link "
                      f"(to {tmp_path}/real); fix: rm {tmp_path}/link")
    assert e.errno == errno.ELOOP and os.listdir(tmp_path / "real") == []


def test_a_symlink_above_is_refused_or_resolved_as_the_rules_say(trusted_tmp_path):
    (trusted_tmp_path / "real" / "d").mkdir(parents=True)
    (trusted_tmp_path / "link").symlink_to(trusted_tmp_path / "real")
    e = refusal(trusted_tmp_path / "link" / "d")
    assert str(e).startswith(f"{trusted_tmp_path}/link/d: refused: {trusted_tmp_path}/link, a directory above it, "
                             f"is a symbolic link (to {trusted_tmp_path}/real)")
    opened(trusted_tmp_path / "link" / "d", STRICT)  # resolved: what it leads to is checked
    e = refusal(trusted_tmp_path / "link", STRICT)  # but the directory itself may not be one
    assert e.fix == f"name the directory itself (--dir {trusted_tmp_path}/real)"


def test_a_symlinked_file_is_refused(tmp_path):
    (tmp_path / "target").write_text("x")
    (tmp_path / "f").symlink_to(tmp_path / "target")
    assert str(file_refusal(tmp_path, "f")) == (
        f"{tmp_path}/f: refused: the file is a symbolic link (to {tmp_path}/target), which lets whoever owns the "
        f"target change it; fix: rm {tmp_path}/f")
    assert file_refusal(tmp_path, "f", STRICT).fix == (  # not one bpfwall writes: a checked copy, not rm
        f"replace it with a root-owned copy you have checked: cp --remove-destination {tmp_path}/target {tmp_path}/f")


# -- owners -----------------------------------------------------------------------------------------

@needs_root
def test_a_directory_owned_by_another_user_is_refused_anywhere_on_the_path(trusted_tmp_path):
    a, b = trusted_tmp_path / "a", trusted_tmp_path / "a" / "b"
    b.mkdir(parents=True)
    os.chown(b, NOBODY, NOBODY)
    e = refusal(b)
    assert str(e) == (f"{b}: refused: the test directory {b} is owned by nobody (uid {NOBODY}), not root; "
                      f"fix: rm -r {b}")
    assert refusal(b, STRICT).fix == f"chown root:root {b}"  # not one bpfwall makes: adopt it, not remove it
    os.chown(b, 0, 0)
    os.chown(a, NOBODY, NOBODY)
    for rules in (STICKY_OK, STRICT):
        e = refusal(b, rules)
        assert f"{a}, a directory above it, is owned by nobody (uid {NOBODY})" in str(e)
        assert e.fix == "keep it elsewhere"


@needs_root
def test_a_file_owned_by_another_user_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    os.chown(tmp_path / "f", NOBODY, NOBODY)
    assert str(file_refusal(tmp_path, "f")) == (
        f"{tmp_path}/f: refused: the file is owned by nobody (uid {NOBODY}), not root; fix: rm {tmp_path}/f")
    assert file_refusal(tmp_path, "f", STRICT).fix == f"chown root:root {tmp_path}/f"


# -- modes ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, who", [(0o775, "group"), (0o757, "others"), (0o770, "group")])
def test_a_writable_directory_is_refused_anywhere_on_the_path(tmp_path, mode, who):
    (tmp_path / "a" / "b").mkdir(parents=True)
    os.chmod(tmp_path / "a" / "b", mode)
    e = refusal(tmp_path / "a" / "b")
    assert str(e) == (f"{tmp_path}/a/b: refused: the test directory {tmp_path}/a/b is writable by {who} "
                      f"(mode {mode:04o}); fix: chmod go-w {tmp_path}/a/b")
    os.chmod(tmp_path / "a" / "b", 0o755)
    os.chmod(tmp_path / "a", mode)
    e = refusal(tmp_path / "a" / "b")
    assert f"{tmp_path}/a, a directory above it, is writable by {who}" in str(e)
    assert e.fix == f"chmod go-w {tmp_path}/a, or keep it elsewhere"


def test_a_group_writable_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    os.chmod(tmp_path / "f", 0o664)
    assert str(file_refusal(tmp_path, "f")) == (
        f"{tmp_path}/f: refused: the file is writable by group (mode 0664); fix: chmod go-w {tmp_path}/f")


def test_a_sticky_directory_is_accepted_above_or_refused_as_the_rules_say(trusted_tmp_path):
    sticky = trusted_tmp_path / "tmp"
    (sticky / "mine").mkdir(parents=True)
    os.chmod(sticky, 0o1777)  # like /tmp: others may add entries, not rename ours
    opened(sticky / "mine")
    e = refusal(sticky / "mine", STRICT)
    assert f"{sticky}, a directory above it, is writable by group and others (mode 1777, shared like /tmp)" in str(e)
    assert e.fix == "keep it elsewhere"
    e = refusal(sticky)  # never as the directory itself
    assert f"the test directory {sticky} is writable by group and others (mode 1777, shared like /tmp)" in str(e)
    opened(sticky, trusted_from=str(sticky / "mine"))  # unless it lies above where trust starts


def test_a_private_directory_gives_group_and_others_no_access(tmp_path):
    (tmp_path / "above" / "d").mkdir(parents=True)
    os.chmod(tmp_path / "above", 0o755)  # above it, reading is fine
    os.chmod(tmp_path / "above" / "d", 0o750)
    e = refusal(tmp_path / "above" / "d", PRIVATE)
    assert e.problem == "is accessible by group (mode 0750)" and e.fix == f"chmod 700 {tmp_path}/above/d"
    os.chmod(tmp_path / "above" / "d", 0o700)
    opened(tmp_path / "above" / "d", PRIVATE)


# -- making, reading and writing ----------------------------------------------------------------------

def test_missing_directories_are_made_with_the_mode_only_when_asked(tmp_path):
    with pytest.raises(safefs.PathError) as info:
        opened(tmp_path / "a" / "b")
    assert info.value.errno == errno.ENOENT and not isinstance(info.value, safefs.UnsafePath)
    assert str(info.value) == f"{tmp_path}/a/b: cannot open {tmp_path}/a, a directory above it: No such file or directory"
    opened(tmp_path / "a" / "b", PRIVATE, create=True)
    for d in (tmp_path / "a", tmp_path / "a" / "b"):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700


def test_a_file_on_the_path_is_not_a_directory(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(safefs.PathError, match=f"cannot open {tmp_path}/file, a directory above it: Not a directory"):
        opened(tmp_path / "file" / "c", create=True)


def test_a_fifo_is_refused_without_blocking_and_reads_are_bounded(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "big").write_bytes(b"123")
    d = safefs.CheckedDir.open(str(tmp_path), STICKY_OK)
    with d:
        with pytest.raises(safefs.UnsafePath, match="the file is not a regular file"):
            d.read("fifo")
        assert d.read("big", limit=3) == b"123"
        with pytest.raises(safefs.PathError, match="larger than 2 bytes"):
            d.read("big", limit=2)
        assert d.read("none", missing_ok=True) is None


def test_write_replaces_atomically_and_never_through_a_symlink(tmp_path):
    (tmp_path / "x").symlink_to("/etc/passwd")
    with safefs.CheckedDir.open(str(tmp_path), STICKY_OK) as d:
        d.write("x", b"one")
        d.write("x", b"two")
        assert d.read("x") == b"two"
    assert os.listdir(tmp_path) == ["x"] and not (tmp_path / "x").is_symlink()
    assert stat.S_IMODE(os.stat(tmp_path / "x").st_mode) == 0o600


@pytest.mark.parametrize("fail", ["write", "fsync", "rename"])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch, fail):
    with safefs.CheckedDir.open(str(tmp_path), STICKY_OK) as d:
        d.write("x", b"old")
        real = getattr(os, fail)

        def broken(*args, **kw):
            if fail == "write":
                real(args[0], bytes(args[1][:1]))  # a part got written
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(os, fail, broken)
        with pytest.raises(safefs.PathError, match=f"^{tmp_path}/x: cannot write the file: No space left on device$"):
            d.write("x", b"new")
        monkeypatch.undo()
        assert os.listdir(tmp_path) == ["x"] and d.read("x") == b"old"


def test_temporary_names_are_unpredictable_and_a_killed_writers_are_found(tmp_path):
    with safefs.CheckedDir.open(str(tmp_path), STICKY_OK) as d:
        temps = {d.stage("x.json", b"1") for _ in range(3)}
        assert len(temps) == 3 and all(re.fullmatch(r"\.x\.json\.[0-9a-f]{16}\.tmp", t) for t in temps)
        (tmp_path / "y.json").write_text("kept")
        assert sorted(d.remove_temps("x.json")) == sorted(temps)
        assert os.listdir(tmp_path) == ["y.json"]


def test_a_checked_dir_raises_its_users_error_class(tmp_path):
    class LayerError(UserError):
        pass

    os.chmod(tmp_path, 0o777)
    with pytest.raises(LayerError, match="refused: the test directory"):
        safefs.CheckedDir.open(str(tmp_path), STICKY_OK, error=lambda e: LayerError(str(e)))
    os.chmod(tmp_path, 0o700)
    with safefs.CheckedDir.open(str(tmp_path), STICKY_OK, error=lambda e: LayerError(str(e))) as d:
        with pytest.raises(LayerError, match="cannot open the file: No such file"):
            d.read("missing")
