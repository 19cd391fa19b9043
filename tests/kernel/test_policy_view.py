"""`policy match`, `policy show --effective` and `policy check`'s warnings on a real cgroup tree
of the test's own (--cgroup-root), with real programs attached on the path: bpfwall's, one
named like systemd's, and a foreign one."""
from __future__ import annotations

import json
import os
import struct
import subprocess

import pytest

from bpfwall.backends import bpf
from bpfwall.kernel import cgroup, progs
from bpfwall.kernel import syscall as sc
from tests.kernel.invoke import bpfwall

pytestmark = pytest.mark.kernel

# The policy: a glob that used to sit on system.slice too, a unit that must get out,
# and a default that drops everything.
POLICY = """
[units."*"]
egress = "!(remote_addr in 127.0.0.0/8)"

[units."postfix.service"]
egress = "true"

[units."system.slice"]
egress = "false"
"""
RETURN_ONE = struct.pack("<BBhi", 0xB7, 0, 0, 1) + struct.pack("<BBhi", 0x95, 0, 0, 0)


@pytest.fixture
def tree(subtree):
    """system.slice with postfix.service and sshd.service (a process runs in sshd's), and other.slice."""
    paths = {n: os.path.join(subtree, n) for n in ("system.slice", "system.slice/postfix.service",
                                                   "system.slice/sshd.service", "other.slice")}
    for p in paths.values():
        os.mkdir(p)
    sleeper = subprocess.Popen(["sleep", "600"])
    try:
        with open(os.path.join(paths["system.slice/sshd.service"], "cgroup.procs"), "w") as f:
            f.write(str(sleeper.pid))
        yield subtree, paths
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.fixture
def policy(policy_dir):
    (policy_dir / "p.toml").write_text(POLICY.lstrip("\n"))
    return policy_dir


@pytest.fixture
def extra_programs(tree):
    """An empty cgroup_skb program named like systemd's and a foreign one on system.slice's egress."""
    _, paths = tree
    fds = [progs.prog_load(sc.BPF_PROG_TYPE_CGROUP_SKB, RETURN_ONE, "GPL", sc.BPF_CGROUP_INET_EGRESS, name)
           for name in ("sd_fw_egress", "other_tool")]
    try:
        for fd in fds:
            cgroup.attach(paths["system.slice"], fd, "egress")
        yield [progs.prog_info(fd).id for fd in fds]
    finally:
        for fd in fds:
            cgroup.detach(paths["system.slice"], fd, "egress")
            os.close(fd)


def test_match_shows_the_judge_the_path_and_every_program_on_it(tree, policy, pin_root, extra_programs):
    root, paths = tree
    assert bpfwall("load", "postfix.service", "--egress", "true").returncode == 0
    bpf.attach(pin_root, "postfix.service", paths["system.slice/postfix.service"])
    [ours] = cgroup.query(paths["system.slice/postfix.service"], "egress")[1]
    args = ("policy", "match", "--policy-dir", str(policy), "--cgroup-root", root)
    r = bpfwall(*args, "--json", "system.slice/postfix.service")
    assert r.returncode == 0, r.stderr
    view = json.loads(r.stdout)
    assert view["judgement"]["egress"]["how"] == "own"
    assert view["judgement"]["egress"]["judge"]["entry"] == "postfix.service"
    assert view["judgement"]["ingress"]["judge"] is None
    rows = view["path"]
    # every ancestor from the cgroup2 root down: those above the test's root have no policy level
    assert [r["path"] for r in rows][-3:] == [root, paths["system.slice"], paths["system.slice/postfix.service"]]
    assert [(r["cgroup"], r["level"]) for r in rows[-3:]] == [
        ("", 0), ("system.slice", 1), ("system.slice/postfix.service", 2)]
    assert all(r["cgroup"] is None and r["level"] is None for r in rows[:-3])
    assert rows[-2]["entry"]["name"] == "system.slice" and rows[-2]["entry"]["slice_default"]
    sd, other = extra_programs
    assert [(p["id"], p["owner"], p["name"]) for p in rows[-2]["programs"]["egress"]] == [
        (sd, "systemd", "sd_fw_egress"), (other, "foreign", "other_tool")]
    assert rows[-1]["programs"] == {"ingress": [], "egress": [
        {"id": ours, "name": bpf.program_name(pin_root, "postfix.service", "egress"), "owner": "bpfwall",
         "entry": "postfix.service"}]}
    assert view["programs_error"] is None

    text = bpfwall(*args, f"{root}/system.slice/postfix.service").stdout  # absolute under the root too
    assert text.startswith("system.slice/postfix.service\n")
    assert f"  egress: its own entry postfix.service ({policy}/p.toml:4)\n" in text
    assert f"      egress  id {sd} sd_fw_egress (systemd)\n" in text
    assert f"      egress  id {other} other_tool (foreign)\n" in text
    assert f"      egress  id {ours} bpfw_e_" in text and "(bpfwall: postfix.service)" in text
    assert "  passed over: * (" in text

    # sshd has no entry that filters egress but the glob's; other.slice's units: the glob alone
    sshd = json.loads(bpfwall(*args, "--json", "system.slice/sshd.service").stdout)["judgement"]
    assert (sshd["egress"]["how"], sshd["egress"]["judge"]["entry"]) == ("own", "*")
    r = bpfwall(*args, "other.slice/x/y")
    assert r.returncode == 1 and "ingress: unpoliced: no entry sits on it or on any cgroup above it" in r.stdout
    assert "does not exist here: no programs to show" in r.stdout


def test_show_effective_lists_every_cgroup_with_its_judge(tree, policy):
    root, _ = tree
    (policy / "p.toml").write_text(POLICY.replace('[units."*"]', '[units."nomatch-*.service"]').lstrip("\n"))
    r = bpfwall("policy", "show", "--effective", "--policy-dir", str(policy), "--cgroup-root", root)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"every cgroup below {root} ")
    got = {line.split()[0]: " ".join(line.split()[1:]) for line in lines[1:]}
    assert got == {
        "/": "* unpoliced",  # populated: sshd's process runs below it
        "system.slice": "* ingress unpoliced; egress system.slice (default of system.slice): DROPS EVERYTHING",
        "system.slice/postfix.service": "ingress unpoliced; egress postfix.service (own entry)",
        "system.slice/sshd.service": "* ingress unpoliced; egress system.slice (default of system.slice): "
                                     "DROPS EVERYTHING",
        "other.slice": "unpoliced",
    }
    rows = json.loads(bpfwall("policy", "show", "--effective", "--json", "--policy-dir", str(policy),
                              "--cgroup-root", root).stdout)
    sshd = next(r for r in rows if r["cgroup"] == "system.slice/sshd.service")
    assert sshd["populated"] and sshd["egress"]["how"] == "default" and sshd["egress"]["at"] == "system.slice"


def test_check_warns_about_changed_meaning_and_cut_off_units(tree, policy):
    root, paths = tree
    # a slice that only the glob policed before
    os.mkdir(os.path.join(root, "other.slice", "inner.slice"))
    try:
        r = bpfwall("policy", "check", "--policy-dir", str(policy), "--cgroup-root", root)
    finally:
        os.rmdir(os.path.join(root, "other.slice", "inner.slice"))
    assert r.returncode == 0
    f = policy / "p.toml"
    assert r.stderr.splitlines() == [
        f"{f}:1: warning: units.\"*\": names units only now, never a slice (only an entry whose name ends in .slice "
        f"is a slice default), though '*' matches slice names; it used to police other.slice, other.slice/inner.slice, "
        f"which it no longer polices",
        f"{f}:7: warning: units.\"system.slice\": a slice default now: it judges the cgroups below system.slice that "
        f"have no entry of their own (in each direction it filters), instead of being an extra filter ANDed onto "
        f"every cgroup below it",
    ]
    # without the glob, sshd (running, no entry of its own) falls to the default that drops everything
    f.write_text(POLICY.replace('[units."*"]', '[units."nomatch-*.service"]').lstrip("\n"))
    r = bpfwall("policy", "check", "--json", "--policy-dir", str(policy), "--cgroup-root", root)
    warnings = json.loads(r.stdout)["warnings"]
    assert warnings[-1] == (f"{f}:7: warning: units.\"system.slice\": the egress default drops every packet, and "
                            f"system.slice holds 1 running unit without an entry of their own for egress, which it "
                            f"cuts off: sshd.service")
    assert not any("postfix" in w for w in warnings)  # no process in it, and it has its own entry
