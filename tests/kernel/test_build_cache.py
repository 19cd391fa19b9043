"""The compiled-object cache against a local attacker and against damage (issue 8, item 4).

The filter under test passes UDP to 53 and drops UDP to 54; the attacker's
object (`udp`, compiled by bpfwall itself) passes both. Every test plants
entries under the filter's key the way the code under test names them (files
`<key>.<suffix>`, whatever the suffixes), then runs the filter in the kernel
(BPF_PROG_TEST_RUN): the drop must still happen. A "forged" entry also has the
filter's key written inside it, so only the directory and file checks stand in
its way.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from bpfwall.backends import bpf
from bpfwall.build import UnitProgram, build
from bpfwall.lang.checker import analyze

pytestmark = pytest.mark.kernel

NOBODY = 65534
FILTER, ATTACKER = "udp && dst_port == 53", "udp"
FILTERED, ACCEPT_ALL = [True, False], [True, True]


def udp4(dport: int) -> bytes:
    udp = struct.pack("!HHHH", 40000, dport, 8, 0)
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, 17, 0,
                       socket.inet_aton("10.0.0.1"), socket.inet_aton("10.0.0.2")) + udp


def program(expr: str) -> UnitProgram:
    return UnitProgram(analyze(expr), None)


def verdicts(cache) -> list[bool]:
    """The filter's verdicts for UDP to 53 and to 54, built through `cache`."""
    return bpf.test_run(program(FILTER), "ingress", [udp4(53), udp4(54)], cache=Path(cache))


@dataclass
class Entry:
    key: str
    files: dict[str, bytes]  # suffix ('.o', …) → bytes


def _compiled(expr: str, directory: Path) -> Entry:
    directory.mkdir(mode=0o700)
    build(program(expr), directory)
    names = sorted(os.listdir(directory))
    key = names[0].split(".")[0]
    assert names and all(n.startswith(key + ".") for n in names), names
    return Entry(key, {n[len(key):]: (directory / n).read_bytes() for n in names})


@pytest.fixture(scope="module")
def entries(tmp_path_factory) -> tuple[Entry, Entry]:
    tmp = tmp_path_factory.mktemp("bpfwall-cache-entries")
    return _compiled(FILTER, tmp / "filter"), _compiled(ATTACKER, tmp / "attacker")


def comparable(obj):
    """`obj` without the one thing two compiles of a filter differ in: the build directory's
    random name, kept in the BTF's file names."""
    return dataclasses.replace(obj, btf=re.sub(rb"bpfwall-build-[^/]+/", b"bpfwall-build-/", obj.btf))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The filter's object as a fresh compile makes it."""
    return comparable(build(program(FILTER), tmp_path_factory.mktemp("bpfwall-cache-reference")))


def foreign(entries, forged: bool) -> dict[str, bytes]:
    """The attacker's entry named as the filter's; `forged`: with the filter's key inside too."""
    mine, theirs = entries
    return {mine.key + suffix: data.replace(theirs.key.encode(), mine.key.encode()) if forged else data
            for suffix, data in theirs.files.items()}


def plant(directory: Path, files: dict[str, bytes], uid: int = 0, mode: int = 0o600) -> None:
    for name, data in files.items():
        path = directory / name
        path.write_bytes(data)
        os.chown(path, uid, uid)
        os.chmod(path, mode)


def private_dir(path: Path, mode: int = 0o700, uid: int = 0) -> Path:
    path.mkdir()
    os.chown(path, uid, uid)
    os.chmod(path, mode)
    return path


def test_a_forged_entry_in_a_sound_cache_is_used(tmp_path, entries):
    """What root itself wrote is trusted: so the tests below pass only through the owner/path checks."""
    cache = private_dir(tmp_path / "cache")
    plant(cache, foreign(entries, forged=True))
    assert verdicts(cache) == ACCEPT_ALL


@pytest.mark.parametrize("uid, mode", [(0, 0o666), (0, 0o620), (NOBODY, 0o644)])
def test_an_entry_others_can_write_is_not_used(tmp_path, entries, uid, mode):
    """A 0666 entry in a root-owned 0755 directory (and one owned by nobody) is not used."""
    cache = private_dir(tmp_path / "cache", 0o755)
    plant(cache, foreign(entries, forged=True), uid, mode)
    assert verdicts(cache) == FILTERED
    assert verdicts(cache) == FILTERED  # and is replaced by the recompiled entry, not trusted later


def test_a_foreign_entry_planted_under_the_key_is_not_used(tmp_path, entries):
    """The attacker's genuine entry, renamed to the filter's key, in root's own cache."""
    cache = private_dir(tmp_path / "cache")
    plant(cache, foreign(entries, forged=False))
    assert verdicts(cache) == FILTERED


def test_a_symlinked_cache_dir_is_refused(tmp_path, entries, capfd):
    real = private_dir(tmp_path / "real")
    plant(real, foreign(entries, forged=True))
    (tmp_path / "link").symlink_to(real)
    assert verdicts(tmp_path / "link") == FILTERED
    assert f"the compiled-object cache {tmp_path / 'link'} is a symbolic link" in capfd.readouterr().err


def test_a_symlinked_entry_is_refused(tmp_path, entries):
    elsewhere, cache = private_dir(tmp_path / "elsewhere"), private_dir(tmp_path / "cache")
    plant(elsewhere, foreign(entries, forged=True))
    for name in os.listdir(elsewhere):
        (cache / name).symlink_to(elsewhere / name)
    assert verdicts(cache) == FILTERED


def test_a_cache_below_a_directory_another_user_owns_is_refused(tmp_path, entries, capfd):
    """nobody owns a directory on the path: it could swap what lies below at any time."""
    theirs = private_dir(tmp_path / "theirs", 0o755, NOBODY)
    cache = private_dir(theirs / "cache")
    plant(cache, foreign(entries, forged=True))
    assert verdicts(cache) == FILTERED
    err = capfd.readouterr().err
    assert (f"compiling without the cache: {cache}: refused: {theirs}, a directory above it, is owned by nobody "
            f"(uid {NOBODY})") in err


def test_a_corrupted_entry_is_recompiled_not_a_traceback(tmp_path, entries, reference):
    mine, _ = entries
    cache = private_dir(tmp_path / "cache")
    for suffix, good in mine.files.items():
        n = len(good)
        damaged = [b"", good[:n // 2]] + [good[:i] + bytes([good[i] ^ 0xFF]) + good[i + 1:]
                                          for i in range(0, n, max(1, n // 8))]
        for data in damaged:
            plant(cache, {mine.key + s: data if s == suffix else d for s, d in mine.files.items()})
            assert comparable(build(program(FILTER), cache)) == reference, (suffix, len(data))
    assert verdicts(cache) == FILTERED


# The attacker: swap the directory entry `cache` (root's cache) with `evil` (theirs) as fast
# as renameat2(RENAME_EXCHANGE) goes, until SIGTERM; print how many swaps it made.
SWAPPER = """
import ctypes, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
swaps = 0
while not stop:
    swaps += libc.renameat2(-100, b"cache", -100, b"evil", 2) == 0
print(swaps)
"""


class _Payload:
    """Unpickling this runs a shell command (as whoever unpickles it)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")
def test_a_race_for_the_cache_dir_never_runs_a_payload_or_loads_a_foreign_object(entries, capfd):
    """nobody controls a directory on the cache path and swaps the cache in and out while root loads."""
    mine, _ = entries
    base = Path(tempfile.mkdtemp(prefix="bpfwall-test-cache-race-", dir="/tmp"))
    attacker = None
    try:
        os.chmod(base, 0o755)
        theirs = private_dir(base / "theirs", 0o755, NOBODY)
        private_dir(theirs / "cache")  # root's cache, made before the attacker starts
        evil = private_dir(theirs / "evil", 0o755, NOBODY)
        plant(evil, foreign(entries, forged=True), NOBODY, 0o644)
        marker = base / "payload-ran"
        plant(evil, {f"{mine.key}.pickle": pickle.dumps(_Payload(f"touch {marker}"))}, NOBODY, 0o644)
        attacker = subprocess.Popen(
            ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups",
             "/usr/bin/python3", "-c", SWAPPER], cwd=theirs, stdout=subprocess.PIPE, text=True)
        outcomes = []
        for _ in range(100):
            try:
                outcomes.append(verdicts(theirs / "cache"))
            except Exception as e:  # noqa: BLE001 - what the old cache did is the finding
                outcomes.append(f"{type(e).__name__}: {e}")
        attacker.send_signal(signal.SIGTERM)
        swaps = int(attacker.communicate(timeout=10)[0])
        assert swaps > 1000, "the attacker did not run"
        wrong = [o for o in outcomes if o != FILTERED]
        assert not marker.exists() and not wrong, (
            f"payload ran as root: {marker.exists()}; {len(wrong)} of 100 loads did not filter: {wrong[:3]}")
        err = capfd.readouterr().err
        assert err.count("compiling without the cache") == 1, err
        assert f"{theirs}, a directory above it, is owned by nobody (uid {NOBODY})" in err
    finally:
        if attacker is not None and attacker.poll() is None:
            attacker.kill()
            attacker.wait()
        shutil.rmtree(base)
