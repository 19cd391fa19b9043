"""Fixtures of the kernel tier shared by several modules: a watcher's world (cgroup subtree,
policy directory, the daemon) and an nft world (network namespace, table). Helpers that are not
fixtures live in modules of their own: invoke.py, watcher.py, netns.py, sockets.py."""
from __future__ import annotations

import subprocess
import uuid

import pytest

from bpfwall.nft import runner as nft_runner
from bpfwall.sandbox import TempCgroup
from tests.kernel.realpackets import NetNamespace
from tests.kernel.watcher import Daemon, remove_tree


@pytest.fixture
def subtree():
    """A cgroup subtree of the test's own, for a watcher's --cgroup-root; removed with everything in it."""
    cg = TempCgroup("bpfwall-test-watch")
    cg.__enter__()
    try:
        yield cg.path
    finally:
        remove_tree(cg.path)


@pytest.fixture
def policy_dir(trusted_tmp_path):
    """An empty policy directory bpfwall trusts (modules that need files in it override this)."""
    d = trusted_tmp_path / "policy"
    d.mkdir()
    return d


@pytest.fixture
def daemon(tmp_path, subtree, pin_root, policy_dir):
    """A bpf watcher on the test's subtree, pin root and policy, not started yet; killed after."""
    d = Daemon(tmp_path, subtree, pin_root, policy_dir)
    try:
        yield d
    finally:
        d.close()


@pytest.fixture
def netns():
    """A network namespace of the test's own, its loopback up; deleting it deletes its nft tables."""
    name = f"bpfwall-test-{uuid.uuid4().hex[:10]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


@pytest.fixture
def table(tmp_path, monkeypatch):
    """The name of an nft table of the test's own, its state directory under tmp_path."""
    monkeypatch.setenv("BPFWALL_NFT_STATE_DIR", str(tmp_path / "nft-state"))
    return f"bpfwall-test-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def nft_world():
    """A private network namespace (this thread inside it) and one policed cgroup, for a module.

    nft rules belong to a network namespace: the nft backend's libnftables worker is
    restarted inside ours, and again outside it afterwards."""
    with NetNamespace() as netns, TempCgroup("bpfwall-test") as cg:
        nft_runner.reset()
        try:
            yield netns, cg
        finally:
            nft_runner.reset()
