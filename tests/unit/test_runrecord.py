"""Run records (bpfwall/runrecord.py): written whole and locked, found only once their run is
dead, and believed only from a directory and files of our own. No root needed."""
from __future__ import annotations

import os

import pytest

from bpfwall import runrecord, unitkey

PIN_ROOT = "/sys/fs/bpf/bpfwall-unit-test"
UNIT = "run-bpfwall-0123456789ab.scope"


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    path = tmp_path / "state"
    monkeypatch.setenv("BPFWALL_STATE_DIR", str(path))
    return path


def _record(unit: str = UNIT, pin_root: str = PIN_ROOT) -> runrecord.Record:
    return runrecord.Record(unit, pin_root, f"/sys/fs/cgroup/{unit}", os.getpid(), runrecord.new_token())


def _create(record: runrecord.Record) -> runrecord.HeldRecord:
    return runrecord.create(record.pin_root, unitkey.encode(record.unit), record)


def _dead(pin_root: str = PIN_ROOT) -> list[runrecord.DeadRun]:
    return list(runrecord.dead_runs(pin_root))


def test_a_record_reads_back_as_written():
    record = _record()
    assert runrecord.Record.from_bytes(record.to_bytes()) == record


@pytest.mark.parametrize("raw", [
    b"", b"[]", b"{",
    b'{"version": 2, "unit": "a.scope", "pin_root": "/x", "cgroup": null, "pid": 1, "token": "t"}',
    b'{"version": 1, "unit": "a.scope", "pin_root": "/x", "cgroup": null, "pid": "1", "token": "t"}',
    b'{"version": 1, "unit": "a.scope", "pin_root": "/x", "cgroup": null, "pid": 1}',
    b'{"version": 1, "unit": "a.scope", "pin_root": "/x", "cgroup": 7, "pid": 1, "token": "t"}',
    b'{"version": 1, "unit": "a.scope", "pin_root": "/x", "cgroup": null, "pid": 1, "token": "t", "x": 1}',
])
def test_anything_else_is_not_a_record(raw):
    with pytest.raises(ValueError):
        runrecord.Record.from_bytes(raw)


def test_a_record_is_found_only_after_its_run_is_gone(state_dir):
    held = _create(_record())
    assert _dead() == []  # its run holds the lock
    with pytest.raises(runrecord.RecordError, match=f"{UNIT} is in use by another bpfwall run"):
        _create(_record())
    held.release(remove=False)  # the run dies without cleaning up

    (dead,) = _dead()
    assert dead.record == held.record
    assert _dead() == []  # a second gc meanwhile leaves it to the first
    dead.held.release(remove=True)
    assert os.listdir(state_dir) == [] and _dead() == []


def test_a_run_that_cleaned_up_leaves_no_record(state_dir):
    _create(_record()).release(remove=True)
    assert os.listdir(state_dir) == []


def test_records_of_another_pin_root_are_not_looked_at(state_dir):
    _create(_record(pin_root="/sys/fs/bpf/elsewhere")).release(remove=False)
    assert _dead() == []
    assert len(_dead("/sys/fs/bpf/elsewhere")) == 1


def test_a_file_under_a_records_name_that_is_not_one_is_skipped_with_the_reason(state_dir):
    other = _record(unit="other.scope")
    _create(_record()).release(remove=False)
    path = state_dir / os.listdir(state_dir)[0]
    path.write_bytes(other.to_bytes())  # names another unit than its file name says
    (dead,) = _dead()
    assert dead.held is None and dead.path == str(path)
    assert dead.problem == "it is not a bpfwall run record (it names the unit other.scope)"

    path.unlink()
    os.symlink("/etc/passwd", path)
    (dead,) = _dead()
    assert dead.held is None and dead.problem.startswith("it is a symbolic link (to /etc/passwd)")


def test_the_state_directory_is_made_private_and_refused_when_others_can_write_on_its_path(state_dir, tmp_path):
    assert runrecord.open_state_dir(str(state_dir), create=False) is None
    os.close(runrecord.open_state_dir(str(state_dir), create=True))
    assert state_dir.stat().st_mode & 0o777 == 0o700

    for where in (state_dir, state_dir.parent):  # the whole path is checked
        mode = where.stat().st_mode & 0o7777
        where.chmod(0o770)
        with pytest.raises(runrecord.RecordError, match=f"{where}(, a directory above it,)? is writable by group \\(mode 0770\\)"):
            _create(_record())
        where.chmod(mode)

    link = tmp_path / "link"
    link.symlink_to(state_dir)
    with pytest.raises(runrecord.RecordError, match=f"^{link}: refused: the state directory {link} is a symbolic link"):
        runrecord.open_state_dir(str(link), create=False)
