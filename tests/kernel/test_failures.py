"""Failures a user can cause, through the real kernel: a pin root that is not on a bpffs, a
cgroup that vanished, a set fuller than its map, and everything run as nobody (EPERM). Each
is one line on stderr, exit status 2, no traceback, and nothing changed."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from bpfwall.errors import Error
from bpfwall.kernel import cgroup, maps

pytestmark = [pytest.mark.kernel]

EXE = os.path.join(os.path.dirname(sys.executable), "bpfwall")
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
# A UDP packet to port 53 (IPv4, no options), as `bpfwall test --hex` takes it.
UDP53 = "4500001c000000004011000000000000000000000035003500080000"


def bpfwall(*argv, env=None, user=()):
    return subprocess.run([*user, EXE, *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def one_line(proc, *words) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr.startswith("bpfwall: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in proc.stderr, proc.stderr
    return proc.stderr


# -- a pin root that is not on a bpffs (bpffs not mounted there) -------------------------------

@pytest.mark.parametrize("argv", [
    ["load", "a.service", "--ingress", "udp"], ["list"], ["stats", "a.service"],
    ["attach", "a.service", "CGROUP"], ["detach", "a.service", "CGROUP"], ["set", "a.service", "mode=audit"],
    ["unload", "a.service"], ["run", "--ingress", "udp", "--", "true"],
], ids=lambda argv: argv[0])
def test_a_pin_root_off_bpffs_is_one_line(tmp_path, temp_cgroup, argv):
    pins = tmp_path / "pins"
    pins.mkdir(mode=0o700)
    argv = [temp_cgroup.path if a == "CGROUP" else a for a in argv]
    one_line(bpfwall("--pin-root", str(pins), *argv), f"{pins} is not on a BPF filesystem", "mount -t bpf")
    assert list(pins.iterdir()) == []


# -- a cgroup that vanished -------------------------------------------------------------------

@pytest.fixture
def vanished(temp_cgroup):
    path = os.path.join(temp_cgroup.path, "gone")
    os.mkdir(path)
    os.rmdir(path)
    return path


@pytest.mark.parametrize("command", ["attach", "detach"])
def test_a_vanished_cgroup_is_one_line(pin_root, vanished, command):
    assert bpfwall("load", "a.service", "--ingress", "udp").returncode == 0
    one_line(bpfwall(command, "a.service", vanished), f"no such cgroup: {vanished}")


def test_a_cgroup_that_vanished_while_attached_leaves_every_command_working(pin_root, temp_cgroup):
    path = os.path.join(temp_cgroup.path, "gone")
    os.mkdir(path)
    assert bpfwall("load", "a.service", "--ingress", "udp").returncode == 0
    assert bpfwall("attach", "a.service", path).returncode == 0
    os.rmdir(path)
    for argv in (["stats", "a.service"], ["list"], ["load", "a.service", "--ingress", "tcp"],
                 ["set", "a.service", "mode=audit"], ["unload", "a.service"]):
        proc = bpfwall(*argv)
        assert proc.returncode == 0 and proc.stderr == "", (argv, proc.stderr)
    one_line(bpfwall("detach", "a.service", path), "no such cgroup")


# -- a full map ---------------------------------------------------------------------------------

def _set_map(pin_root: str, unit: str, name: str) -> int:
    from bpfwall.kernel import pins

    return pins.get(os.path.join(pin_root, unit.replace(".", "+"), f"set_{name}"))


def test_a_set_fuller_than_its_map_is_one_line_and_changes_nothing(pin_root):
    assert bpfwall("load", "a.service", "--ingress", "udp && dst_port in @p", "--set", "p=1..3",
                   "--set-capacity", "4").returncode == 0
    fd = _set_map(pin_root, "a.service", "p")
    try:
        before = sorted(maps.map_keys(fd, 4))
        one_line(bpfwall("set", "a.service", "@p+10,11"), "@p would hold 5 elements; its map holds 4")
        one_line(bpfwall("set", "a.service", "mode=audit", "@p=0..4294967295"), "its map holds 4")
        one_line(bpfwall("load", "a.service", "--ingress", "udp && dst_port in @p", "--set", "p=1..5",
                         "--set-capacity", "4"), "5 elements do not fit the set's capacity 4")
        assert sorted(maps.map_keys(fd, 4)) == before
        assert "[enforce]" in bpfwall("stats", "a.service").stdout  # mode=audit was not made either
    finally:
        os.close(fd)


def test_the_kernel_refusing_a_full_map_is_an_error_of_one_line(pin_root):
    """What the kernel answers when a map is full (filled behind bpfwall's back) is a KernelError:
    one line, under the root main reports."""
    assert bpfwall("load", "a.service", "--ingress", "udp && dst_port in @p", "--set", "p=1..4",
                   "--set-capacity", "4").returncode == 0
    fd = _set_map(pin_root, "a.service", "p")
    try:
        with pytest.raises(Error) as e:
            maps.map_update(fd, (99).to_bytes(4, sys.byteorder), b"\1")
        assert e.value.errno == errno.E2BIG and "\n" not in str(e.value)
    finally:
        os.close(fd)


# -- as nobody: EPERM ---------------------------------------------------------------------------

@pytest.fixture
def nobody_home():
    """A private directory of nobody's, for its HOME and compiled-object cache."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv missing")
    path = tempfile.mkdtemp(prefix="bpfwall-test-nobody-")
    os.chown(path, 65534, 65534)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.mark.parametrize("argv", [
    ["load", "a.service", "--ingress", "udp"], ["list"], ["stats", "a.service"],
    ["attach", "a.service", "CGROUP"], ["set", "a.service", "mode=audit"], ["unload", "a.service"],
    ["pin", "a.service", "ingress", "/sys/fs/bpf/bpfwall-test-nobody-pin"],
    ["test", "udp", "--hex", UDP53], ["gc"], ["run", "--ingress", "udp", "--", "true"],
    ["--backend", "nft", "load", "a.service", "--ingress", "udp"], ["--backend", "nft", "list"],
    ["nft-restore"],
], ids=lambda argv: "-".join(argv[:3]))
def test_nobody_gets_one_line(pin_root, nobody_home, temp_cgroup, argv):
    assert bpfwall("load", "a.service", "--ingress", "udp").returncode == 0
    assert bpfwall("attach", "a.service", temp_cgroup.path).returncode == 0
    before = cgroup.query(temp_cgroup.path, "ingress")[1]
    env = {"HOME": nobody_home, "BPFWALL_CACHE_DIR": os.path.join(nobody_home, "cache")}
    argv = [temp_cgroup.path if a == "CGROUP" else a for a in argv]
    one_line(bpfwall(*argv, env=env, user=NOBODY))
    assert cgroup.query(temp_cgroup.path, "ingress")[1] == before
    assert not os.path.lexists("/sys/fs/bpf/bpfwall-test-nobody-pin")
