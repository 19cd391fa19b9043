"""`bpfwall watch` with backend "nft" entries: a real daemon, real nftables, real packets.

Everything nft happens in a fresh network namespace of this test (`ip netns add
bpfwall-test-<uuid>`): the daemon is started through `nsenter --net` (which,
unlike `ip netns exec`, leaves /sys and so the cgroup2 mount alone), and the
test's own sockets are made inside it, so `nft flush ruleset` flushes only the
namespace's ruleset. Each test also has its own cgroup subtree, policy
directory, pin root, nft table name and nft state directory, all removed even
when it fails (deleting the namespace deletes its tables).

On this hybrid host the nft backend runs libnftables in its mount-namespace
worker, so every test here exercises that too.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from contextlib import contextmanager

import pytest

from bpfwall.backends import bpf
from bpfwall.nft.runner import needs_worker
from bpfwall.nft.state import StateFile
from tests.kernel.netns import cid, elements, has_element, in_namespace, in_netns, rule_counts
from tests.kernel.sockets import arrived
from tests.kernel.watcher import NftDaemon, attached_id, inside, mkcg, nft_unit, pinned_ids, unit, wait_for, write_policy

pytestmark = pytest.mark.kernel  # no_leaks comes with the daemon fixture

RESTORE_BOUND = 1.0  # seconds, as the issue demands


@pytest.fixture
def daemon(no_leaks, tmp_path, subtree, pin_root, policy_dir, netns, table):
    d = NftDaemon(tmp_path, subtree, pin_root, policy_dir, netns, table)
    try:
        yield d
    finally:
        d.close()  # the worker exits with the daemon (its stdin closes); the netns takes the table


def state_units(table) -> dict:
    return StateFile(table).load().units


@contextmanager
def udp_pair(netns, cgroup_path):
    """Two UDP receivers in the cgroup and a sender outside it, all in the test's netns."""
    with in_namespace(netns):
        with inside(cgroup_path):
            one, two = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with one, two, tx:
        one.bind(("127.0.0.1", 0))
        two.bind(("127.0.0.1", 0))
        yield one, two, tx


# -- elements ----------------------------------------------------------------------

def test_existing_and_new_cgroups_get_their_element(daemon, policy_dir, subtree, netns, table):
    write_policy(policy_dir, nft_unit("a.service", ingress="udp") + nft_unit("app-*.scope", egress="tcp"))
    a = mkcg(subtree, "a.service")
    other = mkcg(subtree, "c.service")
    daemon.start()
    assert has_element(netns, table, "ingress_level_2", a, "a.service/in")
    new = mkcg(subtree, "x.slice/a.service")
    apps = [mkcg(subtree, f"app.slice/app-{i}.scope") for i in range(20)]
    wait_for("new a.service element", lambda: has_element(netns, table, "ingress_level_3", new, "a.service/in"))
    for p in apps:
        wait_for(f"{p} element", lambda p=p: has_element(netns, table, "egress_level_3", p, "app-/2a.scope/out"))
    maps = elements(netns, table)
    assert cid(other) not in {k for m in maps.values() for k in m}
    assert sorted(maps) == ["egress_level_3", "ingress_level_2", "ingress_level_3"]
    daemon.wait_status("policing 22 cgroups with 2 policy entries")
    assert "error" not in daemon.log()


def test_restarted_cgroup_gets_its_new_element_and_the_old_one_goes(daemon, policy_dir, subtree, netns, table):
    write_policy(policy_dir, nft_unit("a.service", ingress="udp"))
    daemon.start()
    path = os.path.join(subtree, "a.service")
    old_ids = []
    for _ in range(4):
        os.mkdir(path)
        now = cid(path)
        wait_for("element of the new cgroup", lambda: has_element(netns, table, "ingress_level_2", path))
        ids = set(elements(netns, table)["ingress_level_2"])
        assert ids == {now}, f"old elements left: {ids - {now}}"
        assert not set(old_ids) & ids
        old_ids.append(now)
        os.rmdir(path)
    wait_for("the last removed cgroup's element gone", lambda: not elements(netns, table).get("ingress_level_2"))
    os.mkdir(path)  # removed and re-created before the watcher reads either event
    os.rmdir(path)
    os.mkdir(path)
    wait_for("element after a quick restart", lambda: set(elements(netns, table).get("ingress_level_2", {}))
             == {cid(path)})
    records = state_units(table)["a.service"].attached
    assert [r.id for r in records] == [cid(path)]
    os.rmdir(path)
    wait_for("state without the removed cgroup", lambda: state_units(table)["a.service"].attached == [])
    assert "error" not in daemon.log()


# -- packets and SIGHUP -----------------------------------------------------------------

def test_udp_filtered_and_sighup_changes_verdicts(daemon, policy_dir, subtree, netns, table):
    a = mkcg(subtree, "a.service")
    with udp_pair(netns, a) as (one, two, tx):
        p1, p2 = one.getsockname()[1], two.getsockname()[1]
        write_policy(policy_dir, nft_unit("a.service", ingress=f"udp && local_port == {p1}"))
        daemon.start()
        assert (arrived(one, tx, p1), arrived(two, tx, p2)) == (5, 0)
        stats = in_netns(netns, "nft", "-j", "list", "counter", "inet", table, "a.service/in.drop").stdout
        assert json.loads(stats)["nftables"][1]["counter"]["packets"] == 5

        write_policy(policy_dir, nft_unit("a.service", ingress=f"udp && local_port == {p2}"))
        daemon.signal(signal.SIGHUP)
        daemon.wait_message("RELOADING=1")
        daemon.wait_message("READY=1")
        assert (arrived(one, tx, p1), arrived(two, tx, p2)) == (0, 5)
        assert state_units(table)["a.service"].ingress == f"udp && local_port == {p2}"
        assert has_element(netns, table, "ingress_level_2", a, "a.service/in")  # kept across the swap
    time.sleep(0.1)  # the guard has looked at the swap's own rule removals: not damage
    assert "error" not in daemon.log() and "restore" not in daemon.log()


def test_sighup_unloads_removed_entries_and_moves_backends(daemon, policy_dir, subtree, netns, table, pin_root):
    write_policy(policy_dir, nft_unit("gone.service", ingress="udp") + unit("move.service", ingress="udp")
                 + nft_unit("back.service", egress="udp"))
    gone, move, back = (mkcg(subtree, n) for n in ("gone.service", "move.service", "back.service"))
    daemon.start()
    assert has_element(netns, table, "ingress_level_2", gone) and has_element(netns, table, "egress_level_2", back)
    assert attached_id(pin_root, move) == pinned_ids(pin_root, "move.service")["ingress"]
    # gone.service leaves; move.service goes from bpf to nft; back.service from nft to bpf.
    write_policy(policy_dir, nft_unit("move.service", ingress="udp") + unit("back.service", egress="udp"))
    daemon.signal(signal.SIGHUP)
    daemon.wait_message("READY=1")
    assert set(state_units(table)) == {"move.service"}
    maps = elements(netns, table)
    assert maps == {"ingress_level_2": {cid(move): "move.service/in"}}
    assert bpf.units(pin_root) == ["back.service"]
    assert attached_id(pin_root, move) is None
    assert attached_id(pin_root, back, "egress") == pinned_ids(pin_root, "back.service")["egress"]
    daemon.wait_status("policing 2 cgroups with 2 policy entries")
    time.sleep(0.1)
    assert "error" not in daemon.log() and "restore" not in daemon.log()


def test_restart_reuses_the_table_and_catches_up(daemon, policy_dir, subtree, netns, table):
    write_policy(policy_dir, nft_unit("a.service", ingress="udp", egress="tcp") + nft_unit("app-*.scope", ingress="icmp"))
    a, app1, app2 = mkcg(subtree, "a.service"), mkcg(subtree, "s.slice/app-1.scope"), mkcg(subtree, "s.slice/app-2.scope")
    daemon.start()
    before = in_netns(netns, "nft", "-j", "list", "table", "inet", table).stdout
    daemon.signal(signal.SIGKILL)
    daemon.wait_exit()
    os.rmdir(app2)  # removed while no watcher runs: its element must go
    app3 = mkcg(subtree, "s.slice/app-3.scope")  # created meanwhile: attached at start
    daemon.start()
    assert "reused" in daemon.log() and "loaded" not in daemon.log()  # not re-rendered
    maps = elements(netns, table)
    assert maps["ingress_level_3"] == {cid(app1): "app-/2a.scope/in", cid(app3): "app-/2a.scope/in"}
    assert maps["ingress_level_2"] == {cid(a): "a.service/in"}
    after = in_netns(netns, "nft", "-j", "list", "table", "inet", table).stdout
    chains = lambda out: {(c["chain"]["name"], c["chain"]["handle"]) for c in json.loads(out)["nftables"] if "chain" in c}
    assert chains(after) == chains(before)  # the same chains, never deleted and made again
    assert "error" not in daemon.log()


# -- the guard ---------------------------------------------------------------------

@pytest.mark.parametrize("how", [["flush", "ruleset"], ["delete", "table", "inet", "{table}"],
                                 ["flush", "table", "inet", "{table}"],
                                 ["flush", "map", "inet", "{table}", "ingress_level_2"]],
                         ids=["flush-ruleset", "delete-table", "flush-table", "flush-map"])
def test_removed_table_is_restored_within_a_second(daemon, policy_dir, subtree, netns, table, how):
    write_policy(policy_dir, nft_unit("a.service", ingress="udp") + nft_unit("b.service", egress="udp"))
    a, b = mkcg(subtree, "a.service"), mkcg(subtree, "x.slice/b.service")
    daemon.start()
    full = elements(netns, table)
    assert full == {"ingress_level_2": {cid(a): "a.service/in"}, "egress_level_3": {cid(b): "b.service/out"}}
    for round_ in range(3):
        t0 = time.monotonic()
        done = in_netns(netns, "nft", *[x.format(table=table) for x in how])
        assert done.returncode == 0, done.stderr
        # `flush table` keeps chains and elements but empties the chains: count rules too
        while elements(netns, table) != full or not all((rule_counts(netns, table) or {"": 0}).values()):
            assert time.monotonic() - t0 < 5, f"not restored after 5 s: {elements(netns, table)}"
            time.sleep(0.005)
        took = time.monotonic() - t0
        print(f"\n{' '.join(how[:2])}: restored with all elements {took * 1e3:.0f} ms after the command started")
        # element removals are the watcher's own detaches too: they wait for the 1 s poll
        assert took <= (RESTORE_BOUND if how[1] != "map" else 1.5)
        wait_for("restore logged", lambda n=round_ + 1: daemon.log().count("warning: restore:") == n)
    new = mkcg(subtree, "y.slice/a.service")  # the watcher keeps attaching after restores
    wait_for("new element after restores", lambda: has_element(netns, table, "ingress_level_3", new))
    assert "error" not in daemon.log()


# -- mixed ---------------------------------------------------------------------------

def test_mixed_bpf_and_nft_entries(daemon, policy_dir, subtree, netns, table, pin_root):
    a = mkcg(subtree, "a.service")  # nft
    b = mkcg(subtree, "b.service")  # bpf
    with udp_pair(netns, a) as (a1, a2, tx), udp_pair(netns, b) as (b1, b2, _):
        pa, pb = a1.getsockname()[1], b2.getsockname()[1]
        write_policy(policy_dir, nft_unit("a.service", ingress=f"udp && local_port == {pa}")
                     + unit("b.service", ingress=f"udp && local_port == {pb}"))
        daemon.start()
        assert elements(netns, table) == {"ingress_level_2": {cid(a): "a.service/in"}}
        assert attached_id(pin_root, a) is None
        assert attached_id(pin_root, b) == pinned_ids(pin_root, "b.service")["ingress"]
        assert (arrived(a1, tx, pa), arrived(a2, tx, a2.getsockname()[1])) == (5, 0)
        assert (arrived(b1, tx, b1.getsockname()[1]), arrived(b2, tx, pb)) == (0, 5)
        c = mkcg(subtree, "x.slice/b.service")
        d = mkcg(subtree, "x.slice/a.service")
        wait_for("bpf on the new b", lambda: attached_id(pin_root, c) == pinned_ids(pin_root, "b.service")["ingress"])
        wait_for("nft on the new a", lambda: has_element(netns, table, "ingress_level_3", d))
        assert attached_id(pin_root, d) is None and not has_element(netns, table, "ingress_level_3", c)
    daemon.wait_status("policing 4 cgroups with 2 policy entries")
    assert "error" not in daemon.log()


# -- privileges --------------------------------------------------------------------

BPF_ONLY = "-all,+bpf,+perfmon,+net_admin"  # units/bpfwall.service's CapabilityBoundingSet


@pytest.mark.skipif(not needs_worker(), reason="unified host: nft runs in-process, no worker")
def test_without_the_dropin_privileges_the_error_names_the_dropin(no_leaks, tmp_path, subtree, pin_root,
                                                                   policy_dir, netns, table):
    write_policy(policy_dir, nft_unit("a.service", ingress="udp"))
    a = mkcg(subtree, "a.service")
    bare = NftDaemon(tmp_path, subtree, pin_root, policy_dir, netns, table,
                     prefix=["setpriv", f"--bounding-set={BPF_ONLY}"])
    with bare:
        proc = subprocess.run(bare.args(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("bpfwall: error: cannot start the nft worker")
    assert "units/examples/bpfwall.service.d/nft-hybrid.conf" in proc.stderr
    assert state_units(table) == {} and not elements(netns, table)  # nothing changed
    # What the drop-in adds (CAP_SYS_ADMIN) is what the worker needs.
    granted = NftDaemon(tmp_path, subtree, pin_root, policy_dir, netns, table,
                        prefix=["setpriv", f"--bounding-set={BPF_ONLY},+sys_admin"])
    try:
        granted.start()
        assert has_element(netns, table, "ingress_level_2", a)
    finally:
        granted.close()


# -- slice defaults ------------------------------------------------------------------

def test_slice_default_and_strict_slice_through_the_watcher(daemon, policy_dir, subtree, netns, table):
    """A slice default judges a unit without an entry, the unit's own entry beats it; a strict
    slice: a cgroup made while the watcher is dead (SIGKILL) stays dropped, and is judged by the
    default once the restarted watcher has classified it."""
    write_policy(policy_dir, '[units."s.slice"]\nbackend = "nft"\ningress = "udp"\nstrict = true\n\n'
                 + nft_unit("own.service", ingress="udp && local_port == 1"))
    own, plain = mkcg(subtree, "s.slice/own.service"), mkcg(subtree, "s.slice/plain.service")
    daemon.start()
    with udp_pair(netns, own) as (o, _, tx), udp_pair(netns, plain) as (p, _, tx2):
        assert arrived(o, tx, o.getsockname()[1]) == 0      # its own entry drops what the default passes
        assert arrived(p, tx2, p.getsockname()[1]) == 5     # no entry: the default passes udp
    daemon.signal(signal.SIGKILL)
    daemon.wait_exit()
    late = mkcg(subtree, "s.slice/late.service")
    with udp_pair(netns, late) as (rx, _, tx):
        assert arrived(rx, tx, rx.getsockname()[1]) == 0    # nobody classified it: held
        daemon.start()
        wait_for("late.service classified",
                 lambda: any(k.cgroup.endswith("s.slice/late.service") for k in state_units(table)["s.slice"].known))
        assert arrived(rx, tx, rx.getsockname()[1]) == 5
