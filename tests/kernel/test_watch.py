"""`bpfwall watch` as a real daemon (tests/kernel/watcher.py): a subprocess with its own cgroup
subtree, pin root, policy directory and state directory, telling a notify socket this test owns
when it is ready.
"""
from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

from bpfwall.backends import bpf
from bpfwall.backends.bpf_backend import BpfBackend
from bpfwall.kernel import cgroup, pins, progs
from bpfwall.policy import load_policy
from tests.kernel.invoke import REPO
from tests.kernel.sockets import arrived
from tests.kernel.watcher import WAIT, attached_id, inside, mkcg, ours, pinned_ids, unit, wait_for, write_policy

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("no_leaks")]


# -- start and reconcile --------------------------------------------------------

def test_reconcile_attaches_existing_matching_cgroups_only(daemon, policy_dir, subtree, pin_root):
    write_policy(policy_dir, unit("a.service", ingress="udp") + unit("b.service", egress="tcp")
                 + unit("app-*.scope", ingress="icmp"))
    a = mkcg(subtree, "a.service")
    sub = mkcg(subtree, "a.service/payload")
    b = mkcg(subtree, "x.slice/b.service")
    app = mkcg(subtree, "user.slice/app-firefox-1.scope")
    other = mkcg(subtree, "c.service")
    daemon.start()
    ids_a, ids_b, ids_app = (pinned_ids(pin_root, n) for n in ("a.service", "b.service", "app-*.scope"))
    assert ours(pin_root, a) == [ids_a["ingress"]]
    assert ours(pin_root, b, "egress") == [ids_b["egress"]] and ours(pin_root, b) == []
    assert ours(pin_root, app) == [ids_app["ingress"]]
    for path in (sub, other, os.path.join(subtree, "x.slice"), subtree):
        assert ours(pin_root, path) == [] and ours(pin_root, path, "egress") == []
    status = [m for m in daemon.messages if "READY=1" in m][0]
    assert "STATUS=policing 3 cgroups with 3 policy entries" in status.splitlines()


def test_invalid_policy_at_start_exits_2_and_changes_nothing(daemon, policy_dir, pin_root, subtree):
    write_policy(policy_dir, unit("a.service", ingress="dst_port && udp"))
    mkcg(subtree, "a.service")
    daemon.start(wait_ready=False)
    assert daemon.wait_exit() == 2
    assert "bpfwall: error:" in daemon.log() and "10-test.toml:" in daemon.log()
    assert not os.path.exists(pin_root) or bpf.units(pin_root) == []


def test_bad_cgroup_root_is_one_error_line(daemon, policy_dir, subtree):
    write_policy(policy_dir, unit("a.service", ingress="udp"))
    args = daemon.args()
    args[args.index("--cgroup-root") + 1] = os.path.join(subtree, "missing")
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("bpfwall: error: no such cgroup:") and proc.stderr.count("\n") == 1


def test_once_reconciles_and_exits(daemon, policy_dir, pin_root, subtree):
    write_policy(policy_dir, unit("a.service", ingress="udp"))
    a = mkcg(subtree, "a.service")
    proc = subprocess.run(daemon.args("--once"), capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert attached_id(pin_root, a) == pinned_ids(pin_root, "a.service")["ingress"]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="compiles run side by side on 2 CPUs or more")
def test_start_compiles_new_units_side_by_side(daemon, policy_dir, pin_root, subtree, clang_runs, monkeypatch):
    """At boot every unit is new: their clang runs overlap instead of taking turns."""
    monkeypatch.setenv("BPFWALL_TEST_TOGETHER", "2")  # each compile waits until both have started
    write_policy(policy_dir, unit("a.service", ingress="udp && dst_port == 1") + unit("b.service", egress="tcp"))
    a = mkcg(subtree, "a.service")
    proc = subprocess.run(daemon.args("--once"), capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (clang_runs.count(), clang_runs.count("alone")) == (2, 0)
    assert sorted(bpf.units(pin_root)) == ["a.service", "b.service"]
    assert attached_id(pin_root, a) == pinned_ids(pin_root, "a.service")["ingress"]


def both_programs(pin_root: str, unit: str) -> set[int] | None:
    """Ids of the kernel's programs named as the unit's ingress and egress, once both exist."""
    names, ids, cur = {bpf.program_name(pin_root, unit, d) for d in bpf.DIRECTIONS}, set(), 0
    while (cur := progs.prog_get_next_id(cur)) is not None:
        if bpf.name_of(cur) in names:
            ids.add(cur)
    return ids if len(ids) == 2 else None


def test_a_new_unit_is_verified_before_the_pin_root_lock(pin_root, trusted_tmp_path):
    """The verifier's work (most of a load) does not wait for the pin root's lock, which only
    covers pinning: the watcher loads many new units side by side. The programs verified early
    are the ones pinned."""
    write_policy(trusted_tmp_path, unit("a.service", ingress="udp", egress="tcp"))
    entry = load_policy(directory=str(trusted_tmp_path)).entries[0]
    units = BpfBackend(pin_root)
    units.prepare(entry)
    root = pins.PinDir.open(pin_root, create=True)
    fcntl.flock(root.fd, fcntl.LOCK_EX)  # what a load of another unit holds
    with ThreadPoolExecutor(1) as pool:
        ensured = pool.submit(units.ensure, entry, None)
        try:
            try:
                early = wait_for("a.service's programs, loaded while the lock is held",
                                 lambda: both_programs(pin_root, "a.service"))
                assert not ensured.done() and not os.path.exists(bpf.unit_dir(pin_root, "a.service"))
            finally:
                root.close()  # releases the lock
            handle, how = ensured.result(WAIT)
            assert how == "loaded" and set(handle.ids.values()) == early
        finally:
            ensured.add_done_callback(lambda f: f.exception() is None and f.result()[0].close())


def test_a_unit_failing_at_start_leaves_what_loaded_meanwhile_recorded(daemon, policy_dir, pin_root, subtree):
    """Units load side by side: when one fails at start the watcher stops (status 2, one error
    line), and every unit loaded meanwhile is in its state, so a later run still owns it."""
    write_policy(policy_dir, unit("a.service", ingress="udp") + unit("b.service", ingress="tcp")
                 + unit("c.service", egress="icmp"))
    os.makedirs(pin_root, 0o700)
    os.mkdir(bpf.unit_dir(pin_root, "b.service"))
    os.chmod(bpf.unit_dir(pin_root, "b.service"), 0o777)  # refused: others could write there
    proc = subprocess.run(daemon.args("--once"), capture_output=True, text=True, cwd=REPO, timeout=60)
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("load: ")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    assert errors[0].startswith("bpfwall: error: ") and bpf.unit_dir(pin_root, "b.service") in errors[0]
    os.rmdir(bpf.unit_dir(pin_root, "b.service"))
    state = json.loads(next(daemon.state_dir.glob("watch-*.json")).read_text())
    assert "a.service" in state["units"] and sorted(state["units"]) == sorted(bpf.units(pin_root))


# -- events ---------------------------------------------------------------------

def test_new_cgroups_are_attached_as_they_appear(daemon, policy_dir, subtree, pin_root):
    write_policy(policy_dir, unit("b.service", ingress="udp") + unit("app-*.scope", egress="tcp"))
    daemon.start()
    ib = pinned_ids(pin_root, "b.service")["ingress"]
    eapp = pinned_ids(pin_root, "app-*.scope")["egress"]
    # Nested, created in one go: the parent's watch may come after its child exists.
    nested = mkcg(subtree, "a.slice/b.service")
    deep = mkcg(subtree, "user.slice/user-1000.slice/user@1000.service/app.slice/b.service")
    wait_for("nested b.service attached", lambda: attached_id(pin_root, nested) == ib)
    wait_for("deep b.service attached", lambda: attached_id(pin_root, deep) == ib)
    # A burst.
    burst = [mkcg(subtree, f"app.slice/app-{i}.scope") for i in range(60)]
    for path in burst:
        wait_for(f"{path} attached", lambda p=path: attached_id(pin_root, p, "egress") == eapp)
    # Non-matching cgroups and sub-cgroups of units get nothing of their own.
    quiet = [mkcg(subtree, "c.service"), mkcg(subtree, "a.slice/b.service/worker"),
             mkcg(subtree, "app.slice/app-1.scope/inner.scope.d")]
    late = mkcg(subtree, "a.slice/sentinel/b.service")  # processed after the quiet ones
    wait_for("sentinel attached", lambda: attached_id(pin_root, late) == ib)
    for path in quiet:
        assert ours(pin_root, path) == [] and ours(pin_root, path, "egress") == []
    assert "error" not in daemon.log()


def test_restarted_unit_gets_attached_again(daemon, policy_dir, subtree, pin_root):
    write_policy(policy_dir, unit("a.service", ingress="udp"))
    daemon.start()
    ia = pinned_ids(pin_root, "a.service")["ingress"]
    path = os.path.join(subtree, "a.service")
    for _ in range(5):
        os.mkdir(path)
        wait_for("a.service attached", lambda: attached_id(pin_root, path) == ia)
        os.rmdir(path)
    os.mkdir(path)  # removed and re-created before the watcher reads either event
    os.rmdir(path)
    os.mkdir(path)
    wait_for("a.service attached after a quick restart", lambda: attached_id(pin_root, path) == ia)
    os.rmdir(path)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0
    assert "error" not in daemon.log()


# -- SIGHUP ---------------------------------------------------------------------

def test_sighup_swaps_programs_in_place_and_changes_verdicts(daemon, policy_dir, subtree, pin_root):
    a = mkcg(subtree, "a.service")
    with inside(a):
        one, two = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with one, two, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        one.bind(("127.0.0.1", 0))
        two.bind(("127.0.0.1", 0))
        p1, p2 = one.getsockname()[1], two.getsockname()[1]
        write_policy(policy_dir, unit("a.service", ingress=f"udp && local_port == {p1}"))
        daemon.start()
        before = attached_id(pin_root, a)
        assert (arrived(one, tx, p1), arrived(two, tx, p2)) == (5, 0)

        write_policy(policy_dir, unit("a.service", ingress=f"udp && local_port == {p2}"))
        daemon.signal(signal.SIGHUP)
        daemon.wait_message("RELOADING=1")
        daemon.wait_message("READY=1")
        after = attached_id(pin_root, a)
        assert after is not None and after != before
        assert pinned_ids(pin_root, "a.service")["ingress"] == after
        assert (arrived(one, tx, p1), arrived(two, tx, p2)) == (0, 5)


def test_sighup_with_invalid_policy_keeps_the_old_one(daemon, policy_dir, subtree, pin_root):
    write_policy(policy_dir, unit("a.service", ingress="udp"))
    a = mkcg(subtree, "a.service")
    daemon.start()
    before = attached_id(pin_root, a)
    write_policy(policy_dir, unit("a.service", ingress="udp && dst_port == 70000"))
    daemon.signal(signal.SIGHUP)
    daemon.wait_message("READY=1")
    assert "warning: reload:" in daemon.log() and "keeping the running policy" in daemon.log()
    assert attached_id(pin_root, a) == before
    again = mkcg(subtree, "x.slice/a.service")  # the old policy still serves new cgroups
    wait_for("new cgroup attached under the old policy", lambda: attached_id(pin_root, again) == before)


def test_sighup_repoints_detaches_and_unloads(daemon, policy_dir, subtree, pin_root):
    write_policy(policy_dir, unit("app-*.scope", ingress="udp") + unit("gone.service", ingress="tcp"))
    glob = mkcg(subtree, "app-web.scope")
    gone = mkcg(subtree, "gone.service")
    daemon.start()
    glob_id = attached_id(pin_root, glob)
    assert glob_id is not None and attached_id(pin_root, gone) is not None
    # app-web.scope now gets its own exact entry; gone.service leaves the policy; new.service arrives.
    new = mkcg(subtree, "new.service")
    write_policy(policy_dir, unit("app-*.scope", ingress="udp") + unit("app-web.scope", egress="icmp")
                 + unit("new.service", ingress="icmp"))
    daemon.signal(signal.SIGHUP)
    daemon.wait_message("READY=1")
    assert attached_id(pin_root, glob) is None  # the glob's program left it …
    assert attached_id(pin_root, glob, "egress") == pinned_ids(pin_root, "app-web.scope")["egress"]  # … for its own
    assert pinned_ids(pin_root, "app-*.scope")["ingress"] == glob_id  # unchanged entry: not swapped
    assert cgroup.query(gone, "ingress")[1] == [] and "gone.service" not in bpf.units(pin_root)
    assert attached_id(pin_root, new) == pinned_ids(pin_root, "new.service")["ingress"]
    assert "STATUS=policing 2 cgroups with 3 policy entries (1 of them matches no cgroup now)" in daemon.messages[-1].splitlines()


# -- stopping and restarting ------------------------------------------------------

def test_sigterm_leaves_filters_attached_and_pinned(daemon, policy_dir, subtree, pin_root):
    write_policy(policy_dir, unit("a.service", ingress="udp", egress="udp"))
    a = mkcg(subtree, "a.service")
    daemon.start()
    ids = pinned_ids(pin_root, "a.service")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0
    assert "STOPPING=1" in daemon.wait_message("STOPPING=1")
    assert attached_id(pin_root, a) == ids["ingress"]
    assert attached_id(pin_root, a, "egress") == ids["egress"]


def test_sigkill_then_restart_attaches_nothing_twice(daemon, policy_dir, subtree, pin_root):
    write_policy(policy_dir, unit("a.service", ingress="udp", egress="tcp") + unit("app-*.scope", ingress="icmp"))
    paths = [mkcg(subtree, "a.service"), mkcg(subtree, "s.slice/app-1.scope")]
    daemon.start()
    before = {p: (attached_id(pin_root, p), attached_id(pin_root, p, "egress")) for p in paths}
    daemon.signal(signal.SIGKILL)
    daemon.wait_exit()
    later = mkcg(subtree, "s.slice/app-2.scope")  # appears while no watcher runs
    daemon.start()
    for p in paths:  # same programs (not swapped), each exactly once
        assert (attached_id(pin_root, p), attached_id(pin_root, p, "egress")) == before[p]
    assert attached_id(pin_root, later) == pinned_ids(pin_root, "app-*.scope")["ingress"]
    assert "reused" in daemon.log() and "loaded" not in daemon.log()  # not swapped


def test_second_watcher_on_the_same_pin_root_is_refused(daemon, policy_dir, pin_root):
    write_policy(policy_dir, unit("a.service", ingress="udp"))
    daemon.start()
    proc = subprocess.run(daemon.args(), capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 2
    assert "another bpfwall watch manages the pin root" in proc.stderr


# -- in-process: what a subprocess cannot show ----------------------------------

@contextmanager
def watcher_in_process(tmp_path, subtree, pin_root, policy_dir):
    import io

    from bpfwall.watch.daemon import Watcher
    from bpfwall.watch.log import Log
    from bpfwall.watch.notify import Notifier

    w = Watcher(str(policy_dir), pin_root, subtree, str(tmp_path / "state"), Log(stream=io.StringIO()),
                Notifier(""))
    try:
        w.start()
        yield w
    finally:
        w.close()


def test_queue_overflow_means_a_full_rescan(tmp_path, subtree, pin_root, policy_dir):
    from bpfwall.watch import inotify as ino

    write_policy(policy_dir, unit("app-*.scope", ingress="udp"))
    with watcher_in_process(tmp_path, subtree, pin_root, policy_dir) as w:
        prog = pinned_ids(pin_root, "app-*.scope")["ingress"]
        paths = [mkcg(subtree, f"s.slice/app-{i}.scope") for i in range(5)]
        assert w.inotify.read()  # these events are lost, as in an overflow
        assert all(attached_id(pin_root, p) is None for p in paths)
        w.handle([ino.Event(-1, ino.IN_Q_OVERFLOW, 0, "")])
        assert all(attached_id(pin_root, p) == prog for p in paths)
        assert w.status == "policing 5 cgroups with 1 policy entry"


def test_removed_cgroups_leave_no_watch_or_index_entry(tmp_path, subtree, pin_root, policy_dir):
    write_policy(policy_dir, unit("app-*.scope", ingress="udp"))
    with watcher_in_process(tmp_path, subtree, pin_root, policy_dir) as w:
        watched = set(w.watches.values())
        for round in range(3):
            paths = [mkcg(subtree, f"s{round}.slice/app-{i}.scope") for i in range(10)]
            w.handle(w.inotify.read())
            assert len(w.attached) == 10
            for p in paths:
                os.rmdir(p)
            os.rmdir(os.path.dirname(paths[0]))
            w.handle(w.inotify.read())
            assert w.attached == {} and set(w.watches.values()) == watched and set(w.wd_of) == watched
