"""Waiting on the kernel and on the nft worker, bounded: an interrupted netlink dump is made
again (not taken for damage), a dump nobody answers and a stuck worker time out, and the
worker is replaced.

The interrupted dumps happen in a fresh network namespace of the test's (`ip netns add
bpfwall-test-<uuid>`), where a thread changes the ruleset in a loop while the dumps run.
"""
from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import uuid

import pytest

from bpfwall.nft import dump, runner
from bpfwall.nft.errors import NftError
from tests.kernel.netns import enter, in_netns
from tests.kernel.watcher import mkcg, nft_unit, write_policy

pytestmark = pytest.mark.kernel

CHAINS = 2000  # a dump of this many chains spans about ten datagrams
CHURN = 0.01   # seconds between two changes of the other table


def _churning(table: str):
    """Start a thread that adds and deletes a chain of `table` (made first, so its chains come
    first in every dump and each change shifts where the kernel resumes); its stop function."""
    import nftables

    nft = nftables.Nftables()
    assert nft.cmd(f"add table inet {table}\nadd chain inet {table} first")[0] == 0
    stop = threading.Event()

    def churn():
        i = 0
        while not stop.is_set():
            nft.cmd(f"add chain inet {table} c{i}")
            nft.cmd(f"delete chain inet {table} c{i}")
            i += 1
            time.sleep(CHURN)
    thread = threading.Thread(target=churn)
    thread.start()

    def stopped():
        stop.set()
        thread.join()
    return stopped


def child_dumps(big: str, churn: str, seconds: float) -> None:
    """In the netns: dump a big table's chains and rules again and again while another table
    changes; print how many dumps were wrong, failed and were made again."""
    import nftables

    nft = nftables.Nftables()
    stop = _churning(churn)
    cmds = [f"add table inet {big}"] + [f"add chain inet {big} c{i}" for i in range(CHAINS)]
    cmds += [f"add rule inet {big} c0 accept"] * CHAINS
    assert nft.cmd("\n".join(cmds))[0] == 0
    runs = wrong = errors = 0
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            runs += 1
            try:
                names, rules = dump.chain_names(big), dump.count_rules(big)
            except NftError:
                errors += 1
                continue
            wrong += len(names) != CHAINS or rules != {"c0": CHAINS}
    finally:
        stop()
    print(json.dumps({"runs": runs, "wrong": wrong, "errors": errors, "interrupted": getattr(dump, "interrupted", 0)}))


def test_an_interrupted_dump_is_made_again(netns):
    big, churn = f"bpfwall-test-{uuid.uuid4().hex[:8]}", f"bpfwall-test-{uuid.uuid4().hex[:8]}"
    code = f"from tests.kernel.test_nft_dump import child_dumps; child_dumps({big!r}, {churn!r}, 3)"
    out = in_netns(netns, sys.executable, "-c", code)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    print(f"\n{report}")
    assert report["interrupted"] > 0 and report["wrong"] == 0 and report["errors"] <= report["runs"] // 10


def child_guard(table: str, churn: str, seconds: float) -> None:
    """In the netns: a bpfwall table of many chains (a long `||` becomes a chain per clause), a
    Guard checking it on every event of another table's changes; print the restores made."""
    from bpfwall.backends import nft as backend
    from bpfwall.build import UnitProgram
    from bpfwall.lang.checker import analyze_pair
    from bpfwall.nft.guard import Guard

    stop = _churning(churn)
    for u in range(3):
        expression = " || ".join(f"(tcp && dst_port == {i} && src_port > {u})" for i in range(1, CHAINS // 3))
        backend.load(table, f"u{u}.service", UnitProgram(*analyze_pair(expression, None)))
    try:
        with Guard(table) as guard:
            time.sleep(seconds)
    finally:
        stop()
        backend.destroy(table)
    print(json.dumps({"restores": guard.restores, "errors": guard.errors,
                      "interrupted": getattr(dump, "interrupted", 0)}))


def test_the_guard_does_not_take_an_interrupted_dump_for_damage(netns, tmp_path):
    """Another program changing its own table while the guard dumps chains must not make the
    guard rebuild ours (a rebuild zeroes its counters)."""
    names = [f"bpfwall-test-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    code = f"from tests.kernel.test_nft_dump import child_guard; child_guard(*{names!r}, 3)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "BPFWALL_NFT_STATE_DIR": str(tmp_path / "nft")},
                         preexec_fn=enter(netns))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    print(f"\n{report}")
    assert report["interrupted"] > 0 and report["restores"] == 0


def test_a_dump_nobody_answers_times_out():
    """A message without NLM_F_REQUEST gets no answer from the kernel: the wait is bounded."""
    request = struct.pack("=IHHII", 20, (dump.NFNL_SUBSYS_NFTABLES << 8) | dump.NFT_MSG_GETCHAIN, dump.NLM_F_DUMP,
                          1, 0) + struct.pack("=BBH", 1, 0, 0)
    start = time.monotonic()
    with pytest.raises(NftError, match="^listing: the kernel did not answer within 0.3 s$"):
        dump.exchange(request, "listing", timeout=0.3)
    assert time.monotonic() - start < 1.5


# -- a stuck worker -------------------------------------------------------------------------------

def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _bounded(call, seconds: float, pid: int):
    """Run `call` in a thread; if it has not returned after `seconds` (the old worker waited for
    ever), kill the stopped worker by PID so the thread ends, and fail."""
    result = {}

    def run():
        try:
            result["value"] = call()
        except NftError as e:
            result["error"] = e
    thread = threading.Thread(target=run)
    start = time.monotonic()
    thread.start()
    thread.join(seconds)
    took = time.monotonic() - start
    if thread.is_alive():
        os.kill(pid, signal.SIGKILL)
        thread.join()
        pytest.fail(f"still waiting for the stopped worker after {seconds} s")
    return result, took


@pytest.mark.skipif(not runner.needs_worker(), reason="the worker runs on hybrid cgroup hosts only")
def test_a_stopped_worker_times_out_is_killed_and_replaced():
    worker = runner.Worker()
    worker.timeout = 1.0
    listing = lambda: worker.json([{"list": {"tables": {"family": "inet"}}}], "listing tables")
    try:
        listing()
        pid = worker.proc.pid
        os.kill(pid, signal.SIGSTOP)
        result, took = _bounded(listing, 5, pid)
        assert 1.0 <= took < 2.0
        assert str(result["error"]) == (f"the nft worker (pid {pid}) did not answer within 1 s while listing tables: "
                                        "it was killed (the change may or may not have been made); the next "
                                        "request starts a new one")
        assert _gone(pid)
        assert "nftables" in listing() and worker.proc.pid != pid
    finally:
        worker.close()


@pytest.mark.skipif(not runner.needs_worker(), reason="the worker runs on hybrid cgroup hosts only")
def test_a_stopped_worker_does_not_freeze_the_watcher(no_leaks, tmp_path, subtree, pin_root, policy_dir, monkeypatch):
    """The watcher's attach fails after the timeout (logged), and the cgroup is attached by the
    retry a second later, through a new worker."""
    from bpfwall.backends import nft
    from bpfwall.watch.daemon import RETRY, Watcher
    from bpfwall.watch.log import Log
    from bpfwall.watch.notify import Notifier

    table = f"bpfwall-test-{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv("BPFWALL_NFT_STATE_DIR", str(tmp_path / "nft"))
    write_policy(policy_dir, nft_unit("a.service", ingress="udp"))
    log = io.StringIO()
    w = Watcher(str(policy_dir), pin_root, subtree, str(tmp_path / "state"), Log(stream=log), Notifier(""),
                table=table)
    runner.reset()
    try:
        w.start()
        worker = runner.runner()
        worker.timeout = 1.0
        pid = worker.proc.pid
        os.kill(pid, signal.SIGSTOP)
        path = mkcg(subtree, "a.service")
        _, took = _bounded(lambda: w.handle(w.inotify.read()), 10, pid)
        assert took < 3 and f"the nft worker (pid {pid}) did not answer within 1 s" in log.getvalue()
        assert _gone(pid) and os.stat(path).st_ino not in (dump.cgroup_keys(table, "ingress_level_2") or set())
        time.sleep(RETRY)
        w.retry()
        assert os.stat(path).st_ino in dump.cgroup_keys(table, "ingress_level_2")
        assert w.attached == {path: "a.service"}
    finally:
        w.close()
        runner.reset()
        try:
            nft.destroy(table)
        finally:
            subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True)
