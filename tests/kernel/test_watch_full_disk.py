"""A full state disk (a real tmpfs of a few pages, filled up) must never leave a policed
cgroup unfiltered: the watcher attaches first and records after; a record the disk refuses is
logged, kept in memory and written once there is room, and no temporary file is left. One-shot
nft commands refuse with one line and change nothing.
"""
from __future__ import annotations

import errno
import os
import subprocess
import uuid

import pytest

from bpfwall.nft.state import StateFile
from bpfwall.watch.state import State
from tests.kernel.invoke import bpfwall, one_error_line
from tests.kernel.netns import has_element, listing
from tests.kernel.watcher import Daemon, NftDaemon, attached_id, mkcg, nft_unit, pinned_ids, unit, wait_for, write_policy

pytestmark = pytest.mark.kernel
NO_SPACE = os.strerror(errno.ENOSPC)


class TinyDisk:
    """A tmpfs of 64 KiB mounted at `path`, which fill() fills up and free() frees."""

    def __init__(self, path):
        self.path = str(path)
        os.mkdir(self.path, 0o700)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "bpfwall-test-tiny", self.path],
                       check=True)
        self.filler = os.path.join(self.path, "filler")

    def fill(self) -> None:
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            while True:
                os.write(fd, b"x" * 512)
        except OSError as e:
            assert e.errno == errno.ENOSPC
        finally:
            os.close(fd)

    def free(self) -> None:
        os.unlink(self.filler)

    def temporary_files(self) -> list[str]:
        return [os.path.join(d, n) for d, _, names in os.walk(self.path) for n in names if n.endswith(".tmp")]

    def unmount(self) -> None:
        subprocess.run(["umount", self.path], check=True)


@pytest.fixture
def disk(tmp_path):
    d = TinyDisk(tmp_path / "tiny")
    try:
        yield d
    finally:
        d.unmount()


@pytest.fixture
def bpf_daemon(no_leaks, tmp_path, subtree, pin_root, policy_dir, disk):
    d = Daemon(tmp_path, subtree, pin_root, policy_dir)
    d.state_dir = os.path.join(disk.path, "state")
    try:
        yield d
    finally:
        d.close()


def test_full_disk_leaves_no_bpf_cgroup_unfiltered(bpf_daemon, disk, subtree, pin_root, policy_dir):
    write_policy(policy_dir, unit("app.service", ingress="udp"))
    first = mkcg(subtree, "app.service")
    disk.fill()
    bpf_daemon.start()  # the old watcher died here: pinned, then ENOSPC writing its state, not attached
    prog = pinned_ids(pin_root, "app.service")["ingress"]
    assert attached_id(pin_root, first) == prog
    later = mkcg(subtree, "x.slice/app.service")
    wait_for("the new cgroup's attach", lambda: attached_id(pin_root, later) == prog)
    assert bpf_daemon.log().count(NO_SPACE) == 1 and disk.temporary_files() == []
    state = State(bpf_daemon.state_dir, pin_root)
    assert not os.path.exists(state.path)

    disk.free()
    wait_for("the state written", lambda: os.path.exists(state.path))
    assert state.read() is None and set(state.units) == {"app.service"}
    wait_for("the log line", lambda: "is written again" in bpf_daemon.log())
    assert bpf_daemon.proc.poll() is None and disk.temporary_files() == []


@pytest.fixture
def nft_daemon(no_leaks, tmp_path, subtree, pin_root, policy_dir, netns, table, disk, monkeypatch):
    monkeypatch.setenv("BPFWALL_NFT_STATE_DIR", os.path.join(disk.path, "nft"))
    d = NftDaemon(tmp_path, subtree, pin_root, policy_dir, netns, table)
    d.state_dir = os.path.join(disk.path, "state")
    try:
        yield d
    finally:
        d.close()


def test_full_disk_leaves_no_nft_cgroup_unfiltered(nft_daemon, disk, subtree, netns, table, policy_dir):
    write_policy(policy_dir, nft_unit("a.service", ingress="udp"))
    first = mkcg(subtree, "a.service")
    disk.fill()
    nft_daemon.start()
    assert has_element(netns, table, "ingress_level_2", first, "a.service/in")
    later = mkcg(subtree, "x.slice/a.service")
    wait_for("the new cgroup's element", lambda: has_element(netns, table, "ingress_level_3", later, "a.service/in"))
    assert NO_SPACE in nft_daemon.log() and disk.temporary_files() == []
    sf = StateFile(table, os.path.join(disk.path, "nft"))
    assert not os.path.exists(sf.path)

    disk.free()
    wait_for("the nft state written", lambda: os.path.exists(sf.path))
    attached = {a.id for a in sf.load().units["a.service"].attached}
    assert attached == {os.stat(first).st_ino, os.stat(later).st_ino}
    assert nft_daemon.proc.poll() is None and disk.temporary_files() == []


@pytest.fixture
def nft_cli(disk, temp_cgroup):
    table = f"bpfwall-test-{uuid.uuid4().hex[:10]}"
    env = {"BPFWALL_NFT_STATE_DIR": os.path.join(disk.path, "nft"), "BPFWALL_BACKEND": "nft",
           "BPFWALL_NFT_TABLE": table}
    try:
        yield table, env
    finally:
        subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True)


def test_full_disk_nft_commands_change_nothing(nft_cli, disk, temp_cgroup):
    table, env = nft_cli
    disk.fill()
    one_error_line(bpfwall("load", "a.service", "--ingress", "udp", env=env), NO_SPACE)
    assert listing(table) == "" and disk.temporary_files() == []  # no table made

    disk.free()
    assert bpfwall("load", "a.service", "--ingress", "udp", env=env).returncode == 0
    state = StateFile(table, env["BPFWALL_NFT_STATE_DIR"])
    recorded, before = state.load(), listing(table)
    disk.fill()
    for argv in (["attach", "a.service", temp_cgroup.path], ["load", "a.service", "--ingress", "tcp"],
                 ["set", "a.service", "mode=audit"]):
        one_error_line(bpfwall(*argv, env=env), NO_SPACE)
        assert listing(table) == before and state.load() == recorded and disk.temporary_files() == []
    assert bpfwall("unload", "a.service", env=env).returncode == 0  # removing needs no room
    assert listing(table) == "" and not os.path.exists(state.path)
