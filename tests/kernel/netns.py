"""A network namespace of the test's own (`ip netns add bpfwall-test-<uuid>`, the `netns`
fixture): entering it, running commands and making sockets in it, and what nft lists there.

A child enters it with setns(2) rather than `ip netns exec`, which remounts /sys and so hides
the cgroup2 mount; `nft flush ruleset` in it flushes only the namespace's ruleset.
"""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
from contextlib import contextmanager

CLONE_NEWNET = 0x40000000


def enter(netns: str):
    """A preexec_fn that moves the child into `netns`."""
    def enter_it():
        fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        os.close(fd)
    return enter_it


def in_netns(netns: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, preexec_fn=enter(netns), timeout=30)


@contextmanager
def in_namespace(netns: str):
    """This thread in the test's network namespace (sockets made now live there)."""
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        try:
            yield
        finally:
            if libc.setns(home, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(home)
        os.close(target)


def listing(table: str, netns: str | None = None) -> str:
    """`nft -j list table inet TABLE` (in `netns`, else here); "" while the table does not exist."""
    argv = ["nft", "-j", "list", "table", "inet", table]
    out = in_netns(netns, *argv) if netns else subprocess.run(argv, capture_output=True, text=True, timeout=30)
    return out.stdout if out.returncode == 0 else ""


def rule_counts(netns: str, table: str) -> dict | None:
    """{chain: number of rules} of our table in the netns, or None while it does not exist."""
    out = listing(table, netns)
    if not out:
        return None
    counts: dict = {}
    for x in json.loads(out)["nftables"]:
        if "chain" in x:
            counts.setdefault(x["chain"]["name"], 0)
        elif "rule" in x:
            counts[x["rule"]["chain"]] = counts.get(x["rule"]["chain"], 0) + 1
    return counts


def cgroup_key(key) -> int | str:
    """A vmap key as `nft -j` prints it: a path under /sys/fs/cgroup while the cgroup exists
    (found by walking it), else the bare cgroup id. Either way, the id."""
    if isinstance(key, str) and key.isdigit():
        return int(key)
    try:
        return os.stat(os.path.join("/sys/fs/cgroup", key)).st_ino
    except OSError:
        return key


def elements(netns: str, table: str) -> dict[str, dict]:
    """{map name: {cgroup id: goto target}} of our table, {} while it does not exist."""
    out = listing(table, netns)
    if not out:
        return {}
    maps = {}
    for item in json.loads(out)["nftables"]:
        if "map" in item:
            maps[item["map"]["name"]] = {cgroup_key(k): v["goto"]["target"] for k, v in item["map"].get("elem", [])}
    return maps


def cid(path: str) -> int:
    """A cgroup's id: the inode of its directory."""
    return os.stat(path).st_ino


def has_element(netns, table, mapname, path, chain=None) -> bool:
    """Whether the cgroup at `path` is a key of `mapname` (going to `chain`, if given)."""
    got = elements(netns, table).get(mapname, {}).get(cid(path))
    return got is not None and (chain is None or got == chain)
