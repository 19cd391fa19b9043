"""bpfwall's own units under a real systemd: the loader template with `bpfwall dropin`, the hardened
watcher, and `bpfwall run` through systemd-run --scope.

The units are the repository's units/*.service as they are (ExecStart=/usr/local/bin/bpfwall is the
harness's wrapper), with all their hardening on.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
import uuid

import pytest

from bpfwall.kernel import cgroup, pins, progs
from tests.systemd import container as ct
from tests.systemd.container import REPO
from tests.systemd.services import (
    SENDER, bpfwall_stats, install_counter, install_unit, receiver_state, receiver_unit,
    send_udp, sender_result, unique, wait_counts,
)

pytestmark = [pytest.mark.kernel, pytest.mark.systemd]

N = 20
CAPS = {"cap_bpf", "cap_perfmon", "cap_net_admin"}
RUN_SENDER = "/usr/local/lib/bpfwall-test/run_send.py"


@pytest.fixture(scope="module")
def c(container):
    install_counter(container)
    for unit in ("bpfwall.service", "bpfwall@.service"):
        container.write(f"/etc/systemd/system/{unit}", (REPO / "units" / unit).read_text())
    container.write(RUN_SENDER, "print('CGROUP', open('/proc/self/cgroup').read().split('0::')[1].strip())\n"
                    + SENDER)
    container.systemctl("daemon-reload", check=True)
    return container


def policy(c, text: str, directory: str = "/etc/bpfwall") -> str:
    path = f"{directory}/{uuid.uuid4().hex[:8]}.toml"
    c.write(path, text)
    return path


def host_pin(c, inside: str) -> str:
    return os.path.join(c.bpffs_dir, os.path.relpath(inside, "/sys/fs/bpf"))


def pinned_id(c, inside: str) -> int:
    fd = pins.get(host_pin(c, inside))
    try:
        return progs.prog_info(fd).id
    finally:
        os.close(fd)


def caps(c, unit: str) -> set[str]:
    return set(c.show(unit, "CapabilityBoundingSet")["CapabilityBoundingSet"].split())


def test_dropin_hands_a_service_its_filters_through_the_loader_unit(c):
    svc = unique("recv")  # a '-' in the name: the instance is the unit name verbatim
    loader = f"bpfwall@{svc}.service"
    file = policy(c, f'[units."{svc}"]\ningress = "udp && local_port == 5401"\n')
    install_unit(c, svc, receiver_unit(svc, [5401, 5402]))
    out = c.bpfwall("dropin", svc, check=True).stdout
    assert f"wrote /etc/systemd/system/{svc}.d/bpfwall.conf" in out and "systemd reloaded" in out
    pin = c.bpfwall("path", svc, "ingress", check=True).stdout.strip()

    c.systemctl("start", svc, check=True)  # pulls in the loader (Requires=, After=)
    try:
        assert c.show(loader, "ActiveState", "Result") == {"ActiveState": "active", "Result": "success"}
        assert caps(c, loader) == CAPS
        assert pinned_id(c, pin) in receiver_state(c, svc)["ingress_at_start"]
        send_udp(c, {5401: N, 5402: N})
        assert wait_counts(c, svc, {5401: N}) == {5401: N, 5402: 0}

        # A changed policy goes live with `systemctl reload` of the loader, in place.
        c.write(file, f'[units."{svc}"]\ningress = "udp && local_port == 5402"\n')
        pid = c.show(svc, "MainPID")["MainPID"]
        c.systemctl("reload", loader, check=True)
        assert cgroup.query(c.unit_cgroup(svc), "ingress")[1] == [pinned_id(c, pin)]
        send_udp(c, {5401: N, 5402: N})
        assert wait_counts(c, svc, {5401: N, 5402: N}) == {5401: N, 5402: N}
        assert c.show(svc, "MainPID")["MainPID"] == pid

        # Stopping the loader stops the service first, then unpins.
        c.systemctl("stop", loader, check=True)
        assert c.show(svc, "ActiveState")["ActiveState"] == "inactive"
        assert c.show(loader, "Result")["Result"] == "success"
        assert not os.path.exists(os.path.dirname(host_pin(c, pin)))
    finally:
        c.systemctl("stop", svc, loader)
        c.remove(file)
    out = c.bpfwall("dropin", "--remove", svc, check=True).stdout
    assert "removed" in out and not c.path(f"/etc/systemd/system/{svc}.d").exists()
    assert c.show(svc, "DropInPaths")["DropInPaths"] == ""


def test_missing_policy_entry_fails_closed(c):
    svc = unique("nopolicy")
    install_unit(c, svc, receiver_unit(svc, [5451]))
    c.bpfwall("dropin", svc, "--directions", "ingress", check=True)
    try:
        assert c.systemctl("start", svc).returncode != 0
        assert c.show(svc, "ActiveState")["ActiveState"] != "active"
        assert f"no policy entry for {svc} in /etc/bpfwall" in c.journal(f"bpfwall@{svc}.service")
    finally:
        c.bpfwall("dropin", "--remove", svc, check=True)
        c.systemctl("reset-failed")


def test_a_backslash_in_the_unit_name_reaches_bpfwall_unchanged(c):
    """%i in ExecStart= is not C-unescaped: `esc\\x2dNAME.service` stays what it is."""
    svc = f"esc\\x2d{uuid.uuid4().hex[:6]}.service"
    file = policy(c, f"[units.'{svc}']\ningress = \"udp && local_port == 5461\"\n")
    install_unit(c, svc, receiver_unit(svc.replace("\\", "_"), [5461]))
    c.bpfwall("dropin", svc, check=True)
    c.systemctl("start", svc, check=True)
    try:
        stats = bpfwall_stats(c, svc)
        assert [a["direction"] for a in stats["attached"]] == ["ingress"]
        assert stats["attached"][0]["cgroup"].endswith(f"/{svc}")
    finally:
        c.systemctl("stop", svc, f"bpfwall@{svc}.service")
        c.bpfwall("dropin", "--remove", svc, check=True)
        c.remove(file)


@pytest.mark.parametrize("kind", ["slice", "scope"])
def test_dropin_polices_a_slice_and_a_named_scope(c, kind):
    """IP*FilterPath= in [Slice] reaches every unit in the slice; a transient scope started
    with a known name picks up its drop-in too."""
    receiver, unit = unique("sink"), unique("egress", kind)
    file = policy(c, f'[units."{unit}"]\negress = "udp && remote_port == 5701"\n')
    install_unit(c, receiver, receiver_unit(receiver, [5701, 5702]))
    c.bpfwall("dropin", unit, check=True)
    text = c.path(f"/etc/systemd/system/{unit}.d/bpfwall.conf").read_text()
    assert f"[{kind.capitalize()}]\nIPEgressFilterPath=" in text
    c.systemctl("start", receiver, check=True)
    try:
        if kind == "slice":
            proc = c.systemd_run("--wait", "--pipe", f"--slice={unit}", "--",
                                 "python3", RUN_SENDER, f"5701x{N}", f"5702x{N}")
        else:
            proc = c.systemd_run("--wait", "--pipe", "--", "systemd-run", "--scope", "--quiet",
                                 f"--unit={unit}", "--", "python3", RUN_SENDER, f"5701x{N}", f"5702x{N}")
        assert proc.returncode == 0, proc.stderr
        result = sender_result(proc.stdout)
        assert (len(result["sent"][5701]), len(result["refused"][5702])) == (N, N), proc.stdout
        assert wait_counts(c, receiver, {5701: N}) == {5701: N, 5702: 0}
        assert c.show(f"bpfwall@{unit}.service", "ActiveState")["ActiveState"] == "active"
    finally:
        c.systemctl("stop", receiver, unit, f"bpfwall@{unit}.service")
        c.bpfwall("dropin", "--remove", unit, check=True)
        c.remove(file)


def test_hardened_watcher_reaches_ready_and_attaches(c):
    directory = f"/etc/bpfwall-watch-{uuid.uuid4().hex[:6]}"
    svc = unique("watched")
    policy(c, f'[units."{svc}"]\ningress = "udp && local_port == 5501"\n', directory)
    c.write("/etc/systemd/system/bpfwall.service.d/test.conf",
            f"[Service]\nEnvironment=BPFWALL_POLICY_DIR={directory}\n")
    install_unit(c, svc, receiver_unit(svc, [5501, 5502]))
    try:
        c.systemctl("start", "bpfwall.service", check=True)  # Type=notify: returns once READY=1
        props = c.show("bpfwall.service", "ActiveState", "SubState", "NotifyAccess", "MainPID")
        assert (props["ActiveState"], props["SubState"], props["NotifyAccess"]) == ("active", "running", "main")
        assert caps(c, "bpfwall.service") == CAPS

        c.systemctl("start", svc, check=True)
        pin = c.bpfwall("path", svc, "ingress", check=True).stdout.strip()
        deadline = time.monotonic() + 10
        while pinned_id(c, pin) not in cgroup.query(c.unit_cgroup(svc), "ingress")[1]:
            assert time.monotonic() < deadline, c.journal("bpfwall.service")
            time.sleep(0.02)
        send_udp(c, {5501: N, 5502: N})
        assert wait_counts(c, svc, {5501: N}) == {5501: N, 5502: 0}

        c.systemctl("reload", "bpfwall.service", check=True)  # SIGHUP: re-read the policy
        assert c.show("bpfwall.service", "MainPID")["MainPID"] == props["MainPID"]
        assert c.show("bpfwall.service", "ActiveState")["ActiveState"] == "active"
        assert "error:" not in c.journal("bpfwall.service")
    finally:
        c.systemctl("stop", svc, "bpfwall.service")
        c.remove("/etc/systemd/system/bpfwall.service.d/test.conf")
        c.systemctl("daemon-reload")
        c.bpfwall("unload", svc)


def test_run_goes_through_a_systemd_scope(c):
    receiver, name = unique("sink"), f"job-{uuid.uuid4().hex[:6]}"
    install_unit(c, receiver, receiver_unit(receiver, [5601, 5602]))
    c.systemctl("start", receiver, check=True)
    try:
        # In a transient service, as from a login session: systemd-run --scope moves us out of it.
        proc = c.systemd_run("--wait", "--pipe", "--", "bpfwall", "run", "--name", name,
                             "--egress", "udp && remote_port == 5601", "--",
                             "python3", RUN_SENDER, f"5601x{N}", f"5602x{N}")
        assert proc.returncode == 0, proc.stderr
        assert f"CGROUP /system.slice/{name}.scope" in proc.stdout
        result = sender_result(proc.stdout)
        assert (len(result["sent"][5601]), len(result["refused"][5602])) == (N, N)
        assert wait_counts(c, receiver, {5601: N}) == {5601: N, 5602: 0}
        assert name not in c.bpfwall("list", check=True).stdout  # unpinned when the command ended

        status = c.systemd_run("--wait", "--pipe", "--", "bpfwall", "run", "--egress", "udp", "--",
                               "python3", "-c", "import sys; sys.exit(5)")
        assert status.returncode == 5, status.stderr
        units = [r["unit"] for r in json.loads(c.bpfwall("list", "--json", check=True).stdout)]
        assert not [u for u in units if u.startswith("run-bpfwall-") or u == f"{name}.scope"]
    finally:
        c.systemctl("stop", receiver)


class InstalledContainer(ct.Container):
    """A container whose tree gets `make install` and an enabled bpfwall.service before it boots."""

    policy = ""

    def _prepare(self) -> None:
        super()._prepare()
        make = subprocess.run(["make", "-s", "install", f"DESTDIR={self.merged}"], cwd=REPO,
                              capture_output=True, text=True)
        if make.returncode != 0:
            raise ct.ContainerError(f"make install failed: {make.stderr.strip()}")
        self.write("/etc/bpfwall/10-boot.toml", self.policy)
        wants = self.path("/etc/systemd/system/sysinit.target.wants")
        wants.mkdir(parents=True, exist_ok=True)
        (wants / "bpfwall.service").symlink_to("/usr/local/lib/systemd/system/bpfwall.service")


def test_installed_and_enabled_watcher_polices_from_boot(systemd_rootfs):
    """make install + enable: at boot the watcher (the installed copy, not the repository)
    is up before sysinit.target, with no ordering cycle, and polices what the policy names."""
    c = InstalledContainer(systemd_rootfs, REPO)
    c.policy = '[units."systemd-journald.service"]\negress = "true"\n'
    c.start()
    try:
        assert c.show("bpfwall.service", "ActiveState")["ActiveState"] == "active", c.journal("bpfwall.service")
        order = c.exec(["systemctl", "list-dependencies", "--after", "--plain", "sysinit.target"], check=True).stdout
        assert "bpfwall.service" in order
        assert "cycle" not in c.journal(None, "-b").lower()
        main_pid = c.show("bpfwall.service", "MainPID")["MainPID"]
        cmdline = c.exec(["cat", f"/proc/{main_pid}/cmdline"], check=True).stdout.split("\0")
        assert cmdline[:3] == ["/usr/bin/python3", "-I", "/usr/local/bin/bpfwall"], cmdline
        stats = json.loads(c.exec(["/usr/local/bin/bpfwall", "stats", "systemd-journald.service", "--json"],
                                  check=True).stdout)
        assert [a["direction"] for a in stats["attached"]] == ["egress"]
    finally:
        c.stop()
