"""Hand-off: systemd itself attaches bpfwall's pinned programs (IPIngressFilterPath=/IPEgressFilterPath=).

Everything runs under a real systemd in a container: a loader unit pins the
filters with `bpfwall load` before the service starts; systemd attaches them
when it creates the service's cgroup, and refuses to start the service when
the pin is missing.
"""
from __future__ import annotations

import os

import pytest

from bpfwall.kernel import cgroup
from tests.systemd import services
from tests.systemd.services import (
    SENDER, STATE_DIR, bpfwall_stats, host_pin, install_counter, install_unit, loader_unit, packets,
    pinned_prog_id, receiver_state, receiver_unit, send_udp, unique, wait_counts,
)

pytestmark = [pytest.mark.kernel, pytest.mark.systemd]

N = 25  # datagrams per port
SENDER_SCRIPT = "/usr/local/lib/bpfwall-test/udp_send.py"


@pytest.fixture(scope="module")
def c(container):
    install_counter(container)
    return container


def pin_path(c, unit: str, direction: str) -> str:
    path = services.pin_path(c, unit, direction)
    assert path.startswith("/sys/fs/bpf/bpfwall/") and "." not in os.path.basename(os.path.dirname(path))
    return path


def filtered_receiver(c, ports: list[int], ingress: str) -> tuple[str, str, str]:
    """Install receiver + loader units; returns (service, loader, pin path)."""
    svc, loader = unique("recv"), unique("recv-load")
    pin = pin_path(c, svc, "ingress")
    install_unit(c, loader, loader_unit(svc, ingress=ingress))
    install_unit(c, svc, receiver_unit(svc, ports, loader=loader, service=(f"IPIngressFilterPath={pin}",)))
    return svc, loader, pin


def test_service_receives_exactly_what_its_ingress_filter_allows(c):
    svc, loader, pin = filtered_receiver(c, [5001, 5002], "udp && local_port == 5001")
    c.systemctl("start", svc, check=True)
    try:
        assert c.show(loader, "ActiveState")["ActiveState"] == "active"
        send_udp(c, {5002: N, 5001: N})
        assert wait_counts(c, svc, {5001: N}) == {5001: N, 5002: 0}

        stats = bpfwall_stats(c, svc)
        assert packets(stats, "ingress", "pass") == N
        assert packets(stats, "ingress", "drop") == N
        state = receiver_state(c, svc)
        assert [(a["cgroup"], a["direction"], a["current"]) for a in stats["attached"]] == \
            [("/sys/fs/cgroup" + state["cgroup"], "ingress", True)]

        # systemd attached the pinned program itself, before the service's first process ran.
        prog_id = pinned_prog_id(c, pin)
        assert prog_id in state["ingress_at_start"]
        assert prog_id in cgroup.query(c.unit_cgroup(svc), "ingress")[1]
    finally:
        c.systemctl("stop", svc, loader)


def test_missing_pin_fails_closed(c):
    svc = unique("nopin")
    pin = pin_path(c, svc, "ingress")  # never loaded
    marker = f"{STATE_DIR}/{svc}.ran"
    install_unit(c, svc, "\n".join([
        "[Service]", "Type=oneshot", "StateDirectory=bpfwall-test", f"ExecStart=/usr/bin/touch {marker}",
        f"IPIngressFilterPath={pin}", ""]))
    proc = c.systemctl("start", svc)
    assert proc.returncode != 0
    assert c.systemctl("is-failed", svc).stdout.strip() == "failed"
    assert c.show(svc, "Result")["Result"] == "resources"
    assert f"Loading of ingress BPF program {pin} failed" in c.journal(svc)
    assert not c.path(marker).exists(), "the service ran without its filter"
    c.systemctl("reset-failed", svc)


def test_reload_swaps_the_filter_systemd_attached_and_restart_keeps_it(c):
    svc, loader, pin = filtered_receiver(c, [5201, 5202], "udp && local_port == 5201")
    c.systemctl("start", svc, check=True)
    try:
        pid = c.show(svc, "MainPID")["MainPID"]
        out = c.bpfwall("load", svc, "--ingress", "udp && local_port == 5202", check=True).stdout
        assert "replaced in place on 1 attachment(s)" in out
        new_id = pinned_prog_id(c, pin)
        assert cgroup.query(c.unit_cgroup(svc), "ingress")[1] == [new_id]

        send_udp(c, {5201: N, 5202: N})
        assert wait_counts(c, svc, {5202: N}) == {5201: 0, 5202: N}
        assert c.show(svc, "MainPID")["MainPID"] == pid  # no restart was needed

        # A restart makes a new cgroup: systemd attaches what the pin holds now.
        c.systemctl("restart", svc, check=True)
        assert c.show(svc, "MainPID")["MainPID"] != pid
        assert cgroup.query(c.unit_cgroup(svc), "ingress")[1] == [new_id]
        send_udp(c, {5201: N, 5202: N})
        assert wait_counts(c, svc, {5202: N}) == {5201: 0, 5202: N}
    finally:
        c.systemctl("stop", svc, loader)


def test_egress_filter_path_limits_what_a_service_sends(c):
    receiver = unique("sink")
    install_unit(c, receiver, receiver_unit(receiver, [5101, 5102]))
    sender, loader = unique("send"), unique("send-load")
    pin = pin_path(c, sender, "egress")
    c.write(SENDER_SCRIPT, SENDER)
    install_unit(c, loader, loader_unit(sender, egress="udp && remote_port == 5101"))
    install_unit(c, sender, "\n".join([
        "[Unit]", f"Requires={loader}", f"After={loader}", "",
        "[Service]", "Type=oneshot", "RemainAfterExit=yes",
        f"ExecStart=/usr/bin/python3 {SENDER_SCRIPT} 5101x{N} 5102x{N}", f"IPEgressFilterPath={pin}", ""]))
    c.systemctl("start", receiver, check=True)
    try:
        c.systemctl("start", sender, check=True)
        assert wait_counts(c, receiver, {5101: N}) == {5101: N, 5102: 0}
        stats = bpfwall_stats(c, sender)
        assert (packets(stats, "egress", "pass"), packets(stats, "egress", "drop")) == (N, N)
        log = c.journal(sender)
        assert f"port 5101: sent {N}, refused 0" in log and f"port 5102: sent 0, refused {N}" in log
    finally:
        c.systemctl("stop", sender, loader, receiver)


def test_stopping_the_loader_stops_the_service_and_removes_the_pins(c):
    svc, loader, pin = filtered_receiver(c, [5301], "udp && local_port == 5301")
    c.systemctl("start", svc, check=True)
    host_dir = os.path.dirname(host_pin(c, pin))
    assert os.path.isdir(host_dir)
    c.systemctl("stop", loader, check=True)
    assert c.show(svc, "ActiveState")["ActiveState"] == "inactive"  # Requires= took it down
    assert not os.path.exists(host_dir)
    # Starting the service again pulls the loader in again.
    c.systemctl("start", svc, check=True)
    try:
        send_udp(c, {5301: N})
        assert wait_counts(c, svc, {5301: N}) == {5301: N}
    finally:
        c.systemctl("stop", svc, loader)
