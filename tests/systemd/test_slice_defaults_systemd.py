"""Slice defaults under a real systemd: bpfwall.service (units/, verbatim) puts the bpf slice
guard on a deny-by-default slice; services in it send DNS-like UDP only when their own entry
allows it — attached by the watcher, or handed to systemd with IPEgressFilterPath= — a service
without an entry sends nothing, and a service outside the slice is untouched.

Each sender service waits for a go file before it sends (the host writes it once the watcher has
classified the service's cgroup in the guard's map), so the verdicts do not depend on how fast
the watcher is; the window before that is what the strict kernel tests cover.
"""
from __future__ import annotations

import json
import os

import pytest

from bpfwall.backends.bpf_guard import GuardMap
from bpfwall.kernel import cgroup, pins
from tests.systemd.container import REPO
from tests.systemd.services import (
    STATE_DIR, host_pin, install_counter, install_unit, pin_path, receiver_unit, wait_counts, wait_until,
)

pytestmark = [pytest.mark.kernel, pytest.mark.systemd]

N = 20
DNS, OTHER = 7053, 7054
POLICY_FILE = "/etc/bpfwall/50-slice.toml"
UNITS = os.environ.get("BPFWALL_TEST_UNITS", str(REPO / "units"))
SENDER_FILE = "/usr/local/lib/bpfwall-test/go_sender.py"
# Waits for its go file, sends N datagrams to each port, writes what sendto() refused (EPERM:
# dropped on egress) beside it.
SENDER = """\
import json, os, socket, sys, time
go, ports, n = sys.argv[1], [int(p) for p in sys.argv[2:]], %d
while not os.path.exists(go):
    time.sleep(0.01)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
refused = {}
for port in ports:
    for i in range(n):
        try:
            s.sendto(b"bpfwall-test %%d" %% i, ("127.0.0.1", port))
        except PermissionError:
            refused[port] = refused.get(port, 0) + 1
with open(go + ".result.tmp", "w") as f:
    json.dump(refused, f)
os.replace(go + ".result.tmp", go + ".result")
""" % N

POLICY = f"""
[units."deny.slice"]
egress = "false"

[units."dnsok.service"]
egress = "udp && remote_port == {DNS}"

[units."dnshand.service"]
egress = "udp && remote_port == {DNS}"

[units."user@*.service"]
egress = "udp && remote_port == {OTHER}"

[units."app.slice"]
cgroup = "user@*.service/app.slice"
egress = "udp && remote_port == {DNS}"
"""
USER = "bpfwslice"


def sender_unit(name: str, slice_: str, service: tuple[str, ...] = ()) -> str:
    return "\n".join(["[Unit]", f"Description=bpfwall test sender {name}", "", "[Service]",
                      f"Slice={slice_}", f"ExecStart=/usr/bin/python3 {SENDER_FILE} {STATE_DIR}/{name}.go {DNS} {OTHER}",
                      *service, ""])


@pytest.fixture(scope="module")
def c(container):
    install_counter(container)
    container.write(SENDER_FILE, SENDER)
    container.exec(["mkdir", "-p", STATE_DIR], check=True)
    container.write("/etc/systemd/system/bpfwall.service", open(os.path.join(UNITS, "bpfwall.service")).read())
    container.write("/etc/systemd/system/deny.slice", "[Slice]\n")
    container.write(POLICY_FILE, POLICY)
    container.systemctl("daemon-reload", check=True)
    container.systemctl("start", "bpfwall.service", check=True)
    install_unit(container, "slrecv.service", receiver_unit("slrecv.service", [DNS, OTHER]))
    container.systemctl("start", "slrecv.service", check=True)
    return container


def classes(c, entry: str = "deny.slice") -> dict[int, frozenset]:
    """The classes of an entry's guard (the deny.slice default's), read from the host through the
    container's bpffs; {} while it is no guard."""
    unit_dir = host_pin(c, os.path.dirname(pin_path(c, entry, "egress")))
    with pins.PinDir.open(unit_dir) as d:
        g = GuardMap.open(d)
        if g is None:
            return {}
        try:
            return g.entries()
        finally:
            g.close()


def run_sender(c, name: str, slice_: str, service: tuple[str, ...] = (), classified: bool = True) -> dict:
    """Start the sender service, wait until the watcher classified its cgroup (if it is under the
    guard), let it send; {port: datagrams arrived}, {port: refused}."""
    before = {int(p): n for p, n in json.loads(c.path(f"{STATE_DIR}/slrecv.service.json").read_text())["counts"].items()}
    install_unit(c, name, sender_unit(name, slice_, service))
    c.systemctl("start", name, check=True)
    try:
        cgid = cgroup.cgroup_id(c.unit_cgroup(name))
        if classified:
            wait_until(lambda: cgid in classes(c), f"{name} was not classified by the watcher")
        c.write(f"{STATE_DIR}/{name}.go", "")
        result = wait_until(lambda: c.path(f"{STATE_DIR}/{name}.go.result").exists(), f"{name} did not send")
        assert result
        refused = {int(p): n for p, n in json.loads(c.path(f"{STATE_DIR}/{name}.go.result").read_text()).items()}
        expect = {p: before.get(p, 0) + N - refused.get(p, 0) for p in (DNS, OTHER)}
        after = wait_counts(c, "slrecv.service", expect)
        return {p: after.get(p, 0) - before.get(p, 0) for p in (DNS, OTHER)}, refused
    finally:
        c.systemctl("stop", name)


def test_deny_by_default_slice_with_a_watched_unit_allowed_dns(c):
    assert run_sender(c, "dnsok.service", "deny.slice") == ({DNS: N, OTHER: 0}, {OTHER: N})
    assert run_sender(c, "mute.service", "deny.slice") == ({DNS: 0, OTHER: 0}, {DNS: N, OTHER: N})
    assert run_sender(c, "outside.service", "system.slice", classified=False) == ({DNS: N, OTHER: N}, {})


def test_deny_by_default_slice_with_a_hand_off_unit(c):
    """IPEgressFilterPath= names the unit's pinned program: systemd attaches it when it makes the
    cgroup; the watcher sees it there and tells the guard the unit is judged below."""
    pin = pin_path(c, "dnshand.service", "egress")
    got = run_sender(c, "dnshand.service", "deny.slice", (f"IPEgressFilterPath={pin}",))
    assert got == ({DNS: N, OTHER: 0}, {OTHER: N})
    assert "error" not in c.journal("bpfwall.service").lower()


def test_the_slice_guard_sits_on_the_slice_only(c):
    from tests.systemd.services import attached, pinned_prog_id

    guard = pinned_prog_id(c, pin_path(c, "deny.slice", "egress"))
    assert guard in attached(os.path.join(c.payload_cgroup, "deny.slice"), "egress")
    assert guard not in attached(os.path.join(c.payload_cgroup, "system.slice"), "egress")


def test_a_user_manager_with_its_own_entry_leaves_its_app_slice_to_that_slices_default(c):
    """user@UID.service has its own entry (OTHER only) and holds app.slice, which has a default
    (DNS only): a user service in app.slice is judged by the default alone (DNS), one in
    background.slice by the manager's entry (OTHER) — not by both ANDed (nothing). The watcher
    builds the manager's entry as a guard once it sees app.slice's default inside it."""
    c.exec(["useradd", "--create-home", USER], check=True)
    c.exec(["loginctl", "enable-linger", USER], check=True)
    uid = c.exec(["id", "-u", USER], check=True).stdout.strip()
    wait_until(lambda: c.systemctl("is-active", f"user@{uid}.service").stdout.strip() == "active",
               f"user@{uid}.service did not start")
    home, results = f"/home/{USER}", []
    c.exec(["install", "-d", "-o", USER, f"{home}/go"], check=True)
    for name, slice_ in (("inapp.service", "app.slice"), ("inbg.service", "background.slice")):
        c.write(f"{home}/.config/systemd/user/{name}",
                "\n".join(["[Service]", f"Slice={slice_}",
                           f"ExecStart=/usr/bin/python3 {SENDER_FILE} {home}/go/{name} {DNS} {OTHER}", ""]))
    c.exec(["chown", "-R", f"{USER}:", f"{home}/.config"], check=True)
    c.user_systemctl(USER, "daemon-reload", check=True)
    try:
        for name, below in (("inapp.service", {"egress"}), ("inbg.service", set())):
            before = {int(p): n for p, n in
                      json.loads(c.path(f"{STATE_DIR}/slrecv.service.json").read_text())["counts"].items()}
            c.user_systemctl(USER, "start", name, check=True)
            cgid = cgroup.cgroup_id(c.unit_cgroup(name, user=USER))
            wait_until(lambda: classes(c, "user@*.service").get(cgid) == below,  # noqa: B023 — used at once
                       f"{name} was not classified for user@{uid}.service's entry")
            c.write(f"{home}/go/{name}", "")
            wait_until(lambda: c.path(f"{home}/go/{name}.result").exists(), f"{name} did not send")  # noqa: B023
            refused = {int(p): n for p, n in json.loads(c.path(f"{home}/go/{name}.result").read_text()).items()}
            after = wait_counts(c, "slrecv.service", {p: before.get(p, 0) + N - refused.get(p, 0) for p in (DNS, OTHER)})
            results.append({p: after.get(p, 0) - before.get(p, 0) for p in (DNS, OTHER)})
    finally:
        for name in ("inapp.service", "inbg.service"):
            c.user_systemctl(USER, "stop", name)
    assert results == [{DNS: N, OTHER: 0}, {DNS: 0, OTHER: N}]
    assert "nearer entries" in c.journal("bpfwall.service") and "error" not in c.journal("bpfwall.service").lower()
