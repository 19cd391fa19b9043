"""The watcher as it is deployed: bpfwall.service (units/, verbatim) under a real systemd.

It must attach the policy's programs to a system service, to scopes and to a
`systemd --user` unit of a lingering user — and again after every restart,
since a restart makes a new cgroup; a SIGHUP with a changed expression must
change verdicts without losing one allowed packet; a SIGKILL must leave every
filter enforced, and the restarted watcher must attach nothing twice.
"""
from __future__ import annotations

import json
import os
import re
import time

import pytest

from bpfwall.kernel import cgroup
from tests.systemd.container import REPO
from tests.systemd.services import (
    COUNTER, SENDER, STATE_DIR, attached, bpfwall_stats, install_counter, install_unit, packets,
    pin_path, pinned_prog_id, receiver_state, receiver_unit, send_udp, sender_result, wait_attached,
    wait_counts, wait_until,
)

pytestmark = [pytest.mark.kernel, pytest.mark.systemd]

N = 20          # datagrams per port in traffic checks
RESTARTS = 50
USER = "bpfwtest"
POLICY_FILE = "/etc/bpfwall/50-test.toml"
# $BPFWALL_TEST_UNITS lets a developer try a changed unit file without editing the repository's.
UNITS = os.environ.get("BPFWALL_TEST_UNITS", str(REPO / "units"))


def policy(swap_expr: str = "udp && local_port == 6201") -> str:
    return f"""
[units."wsvc.service"]
ingress = "udp && local_port == 6001"

[units."wscope-*.scope"]
ingress = "udp && local_port == 6101"

[units."wuser.service"]
cgroup = "user@*.service/app.slice/*"
ingress = "udp && local_port == 6301"

[units."wswap.service"]
ingress = "{swap_expr}"

[units."wkill.service"]
ingress = "udp && local_port == 6401"
"""


def start_watcher(c) -> None:
    """bpfwall.service from the repository, started; a failure shows its journal."""
    c.write("/etc/systemd/system/bpfwall.service", open(os.path.join(UNITS, "bpfwall.service")).read())
    c.write(POLICY_FILE, policy())
    c.systemctl("daemon-reload", check=True)
    c.systemctl("start", "bpfwall.service", check=True)


@pytest.fixture(scope="module")
def c(container):
    install_counter(container)
    container.exec(["mkdir", "-p", STATE_DIR], check=True)
    container.exec(["useradd", "--create-home", USER], check=True)
    container.exec(["loginctl", "enable-linger", USER], check=True)
    start_watcher(container)
    uid = container.exec(["id", "-u", USER], check=True).stdout.strip()
    wait_until(lambda: container.systemctl("is-active", f"user@{uid}.service").stdout.strip() == "active",
               f"user@{uid}.service did not start")
    return container


def policy_prog(c, entry: str) -> int:
    """The id of the program the watcher pinned for a policy entry (a unit name or glob)."""
    return pinned_prog_id(c, pin_path(c, entry, "ingress"))


def restart_and_reattach(c, restart, cgroup_of, prog: int) -> list[float]:
    """RESTARTS times: restart, check the cgroup is new, wait for `prog` on it (exactly once).

    Returns how long after the restart returned the program was seen (0.0 when already there).
    """
    seen, waits = set(), []
    for i in range(RESTARTS + 1):
        if i:
            restart()
        path = cgroup_of()
        cg_id = cgroup.cgroup_id(path)
        assert cg_id not in seen, "a restart must make a new cgroup"
        seen.add(cg_id)
        waits.append(wait_attached(path, prog))
    return waits


def report(what: str, waits: list[float]) -> None:
    ready = sum(1 for w in waits if w == 0.0)
    print(f"\n{what}: attached on {len(waits)} cgroups; already attached when the start returned: "
          f"{ready}/{len(waits)}; longest further wait {max(waits) * 1000:.1f} ms")


def test_watcher_attaches_to_a_service_after_each_restart(c):
    prog = policy_prog(c, "wsvc.service")
    install_unit(c, "wsvc.service", receiver_unit("wsvc.service", [6001, 6002]))
    c.systemctl("start", "wsvc.service", check=True)
    try:
        waits = restart_and_reattach(c, lambda: c.systemctl("restart", "wsvc.service", check=True),
                                     lambda: c.unit_cgroup("wsvc.service"), prog)
        report("system service", waits)
        send_udp(c, {6002: N, 6001: N})
        assert wait_counts(c, "wsvc.service", {6001: N}) == {6001: N, 6002: 0}
        stats = bpfwall_stats(c, "wsvc.service")
        assert [(a["cgroup"], a["direction"], a["current"]) for a in stats["attached"]] == \
            [("/sys/fs/cgroup/system.slice/wsvc.service", "ingress", True)]
    finally:
        c.systemctl("stop", "wsvc.service")


def start_scope(c, name: str, *cmd: str) -> str:
    """Start CMD as a transient scope (in the background); the scope's host cgroup once it exists."""
    c.sh(f"systemd-run --quiet --scope --unit={name} {' '.join(cmd)} >/dev/null 2>&1 &", check=True)
    wait_until(lambda: c.systemctl("is-active", name).stdout.strip() == "active", f"{name} did not start")
    return c.unit_cgroup(name)


def test_watcher_attaches_to_scopes(c):
    prog = policy_prog(c, "wscope-*.scope")
    waits = []
    for i in range(RESTARTS):
        path = start_scope(c, f"wscope-{i}.scope", "sleep", "120")
        waits.append(wait_attached(path, prog))
        c.systemctl("stop", f"wscope-{i}.scope", check=True)
    report("scopes", waits)

    # A receiver in a scope gets what the glob entry allows (sockets made before the attach
    # are filtered too: the program runs on the socket's cgroup at delivery).
    state = f"{STATE_DIR}/wscope-recv.json"
    path = start_scope(c, "wscope-recv.scope", "env", "PYTHONPATH=/opt/bpfwall", "python3", COUNTER, state,
                       "6101", "6102")
    try:
        wait_attached(path, prog)
        wait_until(lambda: c.path(state).exists(), "the scope's receiver did not start")
        send_udp(c, {6102: N, 6101: N})
        assert wait_counts(c, "wscope-recv", {6101: N}) == {6101: N, 6102: 0}
    finally:
        c.systemctl("stop", "wscope-recv.scope")


def user_state_dir(c, home: str) -> str:
    """Where the user manager puts StateDirectory= (~/.local/state since systemd 254, ~/.config before)."""
    for sub in (".local/state", ".config"):
        if c.path(f"{home}/{sub}/bpfwall-test").is_dir():
            return f"{home}/{sub}/bpfwall-test"
    raise AssertionError(f"no bpfwall-test state directory under {home}")


def test_watcher_attaches_to_a_user_unit_after_each_restart(c):
    uid = int(c.exec(["id", "-u", USER], check=True).stdout)
    home = f"/home/{USER}"
    unit_file = f"{home}/.config/systemd/user/wuser.service"
    c.write(unit_file, receiver_unit("wuser.service", [6301, 6302]))
    c.exec(["chown", "-R", f"{USER}:", f"{home}/.config"], check=True)
    c.user_systemctl(USER, "daemon-reload", check=True)
    c.user_systemctl(USER, "start", "wuser.service", check=True)
    try:
        path = c.unit_cgroup("wuser.service", user=USER)
        assert path.endswith(f"/user.slice/user-{uid}.slice/user@{uid}.service/app.slice/wuser.service")
        prog = policy_prog(c, "wuser.service")
        waits = restart_and_reattach(c, lambda: c.user_systemctl(USER, "restart", "wuser.service", check=True),
                                     lambda: c.unit_cgroup("wuser.service", user=USER), prog)
        report("user unit", waits)
        send_udp(c, {6302: N, 6301: N})
        assert wait_counts(c, "wuser.service", {6301: N}, state_dir=user_state_dir(c, home)) == {6301: N, 6302: 0}
    finally:
        c.user_systemctl(USER, "stop", "wuser.service")


def test_reload_changes_verdicts_without_losing_an_allowed_packet(c):
    """A steady sender alternates ports 6201 and 6202 (one sequence number across both); the
    policy switches from allowing 6201 to allowing 6202. Exactly the datagrams sent to 6201
    before the switch and to 6202 after it arrive: no gap (both dropped) and no overlap."""
    old = policy_prog(c, "wswap.service")
    install_unit(c, "wswap.service", receiver_unit("wswap.service", [6201, 6202]))
    c.systemctl("start", "wswap.service", check=True)
    try:
        wait_attached(c.unit_cgroup("wswap.service"), old)
        sender = c.popen(["python3", "-c", SENDER, "--steady", "4", "0.001", "6201", "6202"])
        time.sleep(0.8)
        c.write(POLICY_FILE, policy("udp && local_port == 6202"))
        reloaded = time.monotonic()
        c.systemctl("reload", "bpfwall.service", check=True)
        wait_until(lambda: policy_prog(c, "wswap.service") != old, "the reload did not load a new program")
        new = policy_prog(c, "wswap.service")
        wait_attached(c.unit_cgroup("wswap.service"), new)
        switched = time.monotonic() - reloaded
        out, err = sender.communicate(timeout=30)
        assert sender.returncode == 0, err
        assert switched < 3, f"the reload took {switched:.1f} s, longer than the sender's window"
        assert attached(c.unit_cgroup("wswap.service")) == [new]  # swapped, not added

        sent = sender_result(out)["sent"]
        got = {int(p): v for p, v in receive_all(c, "wswap.service").items()}
        assert switch_points(sent, got, old_port=6201, new_port=6202), (
            f"no single switch explains what arrived: 6201 got {len(got[6201])} of {len(sent[6201])} "
            f"(last {max(got[6201], default=None)}), 6202 got {len(got[6202])} of {len(sent[6202])} "
            f"(first {min(got[6202], default=None)})")
        assert got[6201] and len(got[6202]) < len(sent[6202]), "the switch must fall inside the run"

        stats = bpfwall_stats(c, "wswap.service")  # counters survive the swap
        total_got = len(got[6201]) + len(got[6202])
        assert packets(stats, "ingress", "pass") == total_got
        assert packets(stats, "ingress", "drop") == sum(map(len, sent.values())) - total_got
    finally:
        c.systemctl("stop", "wswap.service")
        c.write(POLICY_FILE, policy())
        c.systemctl("reload", "bpfwall.service")


def switch_points(sent: dict, got: dict, old_port: int, new_port: int) -> list[int]:
    """Every t such that exactly the datagrams the old filter allows sent before t, and those the
    new one allows sent from t on, arrived — each once. Empty: a gap, an overlap or a loss."""
    received = got[old_port] + got[new_port]
    if len(received) != len(set(received)):
        return []
    received = set(received)
    last_old = max(got[old_port], default=-1)
    first_new = min(got[new_port], default=max(sent[old_port] + sent[new_port]) + 1)
    return [t for t in range(last_old + 1, first_new + 1)
            if received == {s for s in sent[old_port] if s < t} | {s for s in sent[new_port] if s >= t}]


def receive_all(c, name: str, settle: float = 0.5) -> dict:
    """The receiver's sequence numbers per port, once nothing more arrives."""
    last, deadline = None, time.monotonic() + 10
    while time.monotonic() < deadline:
        seqs = receiver_state(c, name)["seqs"]
        total = sum(map(len, seqs.values()))
        if total == last:
            return seqs
        last = total
        time.sleep(settle)
    raise AssertionError(f"{name} kept receiving")


def test_sigkill_leaves_filters_enforced_and_the_restart_attaches_nothing_twice(c):
    prog = policy_prog(c, "wkill.service")
    install_unit(c, "wkill.service", receiver_unit("wkill.service", [6401, 6402]))
    c.systemctl("start", "wkill.service", check=True)
    try:
        wait_attached(c.unit_cgroup("wkill.service"), prog)
        before = c.show("bpfwall.service", "MainPID", "NRestarts")
        c.systemctl("kill", "--signal=KILL", "bpfwall.service", check=True)
        wait_until(lambda: c.show("bpfwall.service", "MainPID")["MainPID"] != before["MainPID"],
                   "the watcher's main process did not die")

        # Nobody watches now (systemd waits RestartSec=1s), and the filter still holds.
        assert attached(c.unit_cgroup("wkill.service")) == [prog]
        assert c.show("bpfwall.service", "SubState")["SubState"] == "auto-restart"
        send_udp(c, {6402: N, 6401: N})
        assert wait_counts(c, "wkill.service", {6401: N}) == {6401: N, 6402: 0}
        # A cgroup made while the watcher is down (a documented gap) is attached when it is back.
        c.systemctl("restart", "wkill.service", check=True)

        wait_until(lambda: c.show("bpfwall.service", "ActiveState", "SubState") ==
                   {"ActiveState": "active", "SubState": "running"}, "the watcher was not restarted", timeout=15)
        after = c.show("bpfwall.service", "NRestarts")
        assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
        assert policy_prog(c, "wkill.service") == prog  # the same program, not a reload
        wait_attached(c.unit_cgroup("wkill.service"), prog)
        for path, _, _ in os.walk(c.payload_cgroup):  # nothing anywhere carries a program twice
            ids = attached(path)
            assert len(ids) == len(set(ids)), f"{path} carries {ids}"
    finally:
        c.systemctl("stop", "wkill.service")


def drop_records(c, unit: str, port: int) -> list[dict]:
    """`journalctl -u UNIT` records of drop events to `port`, as JSON."""
    out = c.exec(["journalctl", "--no-pager", "--quiet", "-o", "json", "-u", unit], check=True).stdout
    records = [json.loads(line) for line in out.splitlines()]
    return [r for r in records if r.get("BPFWALL_ACTION") == "drop-event" and r.get("DPT") == str(port)]


def test_dropped_packets_show_up_in_the_units_journal(c):
    install_unit(c, "wsvc.service", receiver_unit("wsvc.service", [6001, 6003]))
    c.systemctl("start", "wsvc.service", check=True)
    try:
        wait_attached(c.unit_cgroup("wsvc.service"), policy_prog(c, "wsvc.service"))
        send_udp(c, {6003: N})
        wait_until(lambda: len(drop_records(c, "wsvc.service", 6003)) >= N,
                   f"{N} drop events in journalctl -u wsvc.service", timeout=10)
        records = drop_records(c, "wsvc.service", 6003)
        assert len(records) == N
        for r in records:
            assert {k: r[k] for k in ("UNIT", "OBJECT_SYSTEMD_UNIT", "BPFWALL_DIRECTION", "BPFWALL_VERDICT", "PROTO",
                                      "SRC", "DST", "DPT")} == {
                "UNIT": "wsvc.service", "OBJECT_SYSTEMD_UNIT": "wsvc.service", "BPFWALL_DIRECTION": "ingress",
                "BPFWALL_VERDICT": "DROP", "PROTO": "udp", "SRC": "127.0.0.1", "DST": "127.0.0.1", "DPT": "6003"}
            assert int(r["SPT"]) > 0 and r["_SYSTEMD_UNIT"] == "bpfwall.service"
            assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3} wsvc\.service ingress DROP udp 127\.0\.0\.1:\d+ → "
                                r"127\.0\.0\.1:6003 len \d+", r["MESSAGE"]), r["MESSAGE"]
    finally:
        c.systemctl("stop", "wsvc.service")
