"""The pin tree as an attacker finds it: a bpffs mounted with the kernel's default mode 1777.

Each test mounts a private bpffs (mode 1777, like `mount -t bpf bpf /sys/fs/bpf` gives) and
lets an unprivileged user (nobody, via setpriv) prepare it before bpfwall, as root, uses it.
bpfwall must refuse every directory or pin it did not make itself, naming the path and the fix,
and pin nothing.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from bpfwall.backends import bpf
from bpfwall.kernel import cgroup, pins

pytestmark = [pytest.mark.kernel]

EXE = os.path.join(os.path.dirname(sys.executable), "bpfwall")
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture
def open_bpffs():
    """A private bpffs with mode 1777, unmounted afterwards."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv missing")
    mnt = tempfile.mkdtemp(prefix="bpfwall-test-bpffs-")
    subprocess.run(["mount", "-t", "bpf", "-o", "mode=1777", "bpf", mnt], check=True)
    try:
        yield mnt
    finally:
        for unit in _units_quietly(os.path.join(mnt, "bpfwall")):
            try:
                bpf.unload(os.path.join(mnt, "bpfwall"), unit)
            except Exception:  # noqa: BLE001 — cleanup: the mount goes anyway
                pass
        subprocess.run(["umount", mnt], check=True)
        os.rmdir(mnt)


def _units_quietly(pin_root):
    try:
        return bpf.units(pin_root)
    except Exception:  # noqa: BLE001
        return []


def as_nobody(*argv):
    subprocess.run([*NOBODY, *argv], check=True, capture_output=True)


def bpfwall(pin_root, *args):
    return subprocess.run([EXE, "--pin-root", pin_root, *args], capture_output=True, text=True, timeout=120)


def refused(proc, path, *words):
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert path in proc.stderr, proc.stderr
    for w in words:
        assert w in proc.stderr, proc.stderr


def test_pin_root_planted_by_another_user_is_refused(open_bpffs, temp_cgroup):
    """The attack as reported: nobody makes the pin root first and plants a unit directory whose
    ingress pin is a symlink to an accept-all program; root's load, attach and stats refuse it."""
    root = os.path.join(open_bpffs, "bpfwall")
    as_nobody("mkdir", "-p", os.path.join(root, "a+service"))
    as_nobody("ln", "-s", os.path.join(open_bpffs, "accept-all"), os.path.join(root, "a+service", "ingress"))
    for args in (["load", "a.service", "--ingress", "tcp"], ["attach", "a.service", temp_cgroup.path],
                 ["stats", "a.service"], ["list"], ["unload", "a.service"]):
        refused(bpfwall(root, *args), root, "owned by nobody (uid 65534)", f"fix: rm -r {root}", "mode=0700")
    assert cgroup.query(temp_cgroup.path, "ingress")[1] == []
    assert sorted(os.listdir(os.path.join(root, "a+service"))) == ["ingress"]  # nothing pinned


def test_unit_directory_planted_by_another_user_is_refused(open_bpffs):
    """A root-made pin root that someone left writable: a unit directory made by nobody inside."""
    root = os.path.join(open_bpffs, "bpfwall")
    os.mkdir(root, 0o700)
    os.chmod(root, 0o777)
    refused(bpfwall(root, "load", "a.service", "--ingress", "tcp"), root, "writable by group and others",
            f"chmod go-w {root}")
    os.chmod(root, 0o700)
    unit_dir = os.path.join(root, "a+service")
    os.mkdir(unit_dir)
    os.chown(unit_dir, 65534, 65534)
    refused(bpfwall(root, "load", "a.service", "--ingress", "tcp"), unit_dir, "owned by nobody (uid 65534)")


def test_symlinks_in_the_pin_tree_are_refused(open_bpffs, temp_cgroup):
    """A unit directory or a program pin replaced by a symlink to another unit's (as root could
    have been tricked into, or as an older bpfwall allowed): refused, never followed."""
    root = os.path.join(open_bpffs, "bpfwall")
    assert bpfwall(root, "load", "open.service", "--ingress", "true").returncode == 0
    assert bpfwall(root, "load", "shut.service", "--ingress", "false").returncode == 0
    shut = os.path.join(root, "shut+service")
    os.unlink(os.path.join(shut, "ingress"))
    os.symlink(os.path.join(root, "open+service", "ingress"), os.path.join(shut, "ingress"))
    refused(bpfwall(root, "attach", "shut.service", temp_cgroup.path), os.path.join(shut, "ingress"),
            "symbolic link")
    refused(bpfwall(root, "stats", "shut.service"), os.path.join(shut, "ingress"), "symbolic link")
    assert cgroup.query(temp_cgroup.path, "ingress")[1] == []
    os.unlink(os.path.join(shut, "ingress"))
    subprocess.run(["rm", "-r", shut], check=True)
    os.symlink(os.path.join(root, "open+service"), shut)
    refused(bpfwall(root, "attach", "shut.service", temp_cgroup.path), shut, "symbolic link")
    os.unlink(shut)


def test_nobody_cannot_touch_a_pin_root_bpfwall_made(open_bpffs):
    """On a 1777 bpffs, the pin root bpfwall creates is root's and 0700: nobody can neither
    list, add, replace nor remove anything in it."""
    root = os.path.join(open_bpffs, "bpfwall")
    assert bpfwall(root, "load", "a.service", "--ingress", "tcp").returncode == 0
    assert (os.stat(root).st_uid, os.stat(root).st_mode & 0o777) == (0, 0o700)
    for argv in (["ls", root], ["mkdir", os.path.join(root, "b+service")],
                 ["ln", "-s", "/", os.path.join(root, "a+service", "x")],
                 ["mv", root, root + "2"], ["rm", "-rf", root]):
        assert subprocess.run([*NOBODY, *argv], capture_output=True).returncode != 0, argv
    assert bpf.stats(root, "a.service")["ingress"] == "tcp"


def test_set_waits_for_the_pin_root_lock(pin_root):
    assert bpfwall(pin_root, "load", "a.service", "--ingress", "tcp && dst_port == $p").returncode == 0
    with pins.PinDir.open(pin_root) as root:
        fcntl.flock(root.fd, fcntl.LOCK_EX)
        proc = subprocess.Popen([EXE, "--pin-root", pin_root, "set", "a.service", "p=7"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        assert proc.poll() is None and bpf.stats(pin_root, "a.service")["params"] == {"p": 0}
        fcntl.flock(root.fd, fcntl.LOCK_UN)
        assert proc.wait(60) == 0
    assert bpf.stats(pin_root, "a.service")["params"] == {"p": 7}


def test_attach_and_detach_wait_for_the_pin_root_lock(pin_root, temp_cgroup):
    """attach and detach take the pin root's lock as load does: they never interleave with a
    load or unload in another process."""
    assert bpfwall(pin_root, "load", "a.service", "--ingress", "tcp").returncode == 0
    with pins.PinDir.open(pin_root) as root:
        fcntl.flock(root.fd, fcntl.LOCK_EX)
        results = {}

        def attach():
            results["attach"] = bpfwall(pin_root, "attach", "a.service", temp_cgroup.path)
        t = threading.Thread(target=attach)
        t.start()
        time.sleep(1.0)
        assert t.is_alive() and cgroup.query(temp_cgroup.path, "ingress")[1] == []
        fcntl.flock(root.fd, fcntl.LOCK_UN)
        t.join(60)
    assert results["attach"].returncode == 0
    assert len(cgroup.query(temp_cgroup.path, "ingress")[1]) == 1
    assert bpfwall(pin_root, "detach", "a.service", temp_cgroup.path).returncode == 0
