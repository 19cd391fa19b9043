"""The Debian package as an admin installs it, under a real systemd: `apt install ./bpfwall_*.deb`
in a container that does not see this repository (no /opt/bpfwall, no wrapper in /usr/local/bin),
then the shipped units at work: the hand-off through bpfwall@.service, the watcher
bpfwall.service, reloads of both, and a purge that unloads what bpfwall loaded but keeps the
admin's policy. The test rootfs is shared: each container writes only to its own overlay.
"""
from __future__ import annotations

import shutil
import traceback
from pathlib import Path

import pytest

from bpfwall.kernel import cgroup
from tests.systemd import container as ct
from tests.systemd.services import (
    bpfwall_stats, install_counter, install_unit, packets, pinned_prog_id, receiver_state, receiver_unit,
    send_udp, unique, wait_attached, wait_counts,
)

pytestmark = [pytest.mark.kernel, pytest.mark.systemd, pytest.mark.package]

N = 20  # datagrams per port
POLICY = "/etc/bpfwall/10-deb-test.toml"


def boot_with_package(rootfs, deb) -> ct.Container:
    """A booted container with the package installed by apt from the .deb alone (no network)."""
    c = ct.Container(rootfs, None)
    try:
        c.start()
    except ct.ContainerError as e:
        pytest.fail(f"the test container did not start: {''.join(traceback.format_exception_only(e))}",
                    pytrace=False)
    try:
        shutil.copy(deb, c.path(f"/var/tmp/{deb.name}"))
        c.sh(f"cd /var/tmp && apt install -y ./{deb.name}", timeout=300, check=True)
        install_counter(c)
    except BaseException:
        c.stop()
        raise
    return c


@pytest.fixture(scope="module")
def c(systemd_rootfs, built_deb):
    c = boot_with_package(systemd_rootfs, built_deb)
    try:
        yield c
    finally:
        c.stop()


def write_policy(c, entries: dict[str, str]) -> None:
    """/etc/bpfwall/10-deb-test.toml: one unit entry per (unit, ingress expression)."""
    c.write(POLICY, "".join(f'[units."{u}"]\ningress = "{e}"\n\n' for u, e in entries.items()))


def test_the_package_runs_alone_and_polices_nothing_until_told(c):
    assert not c.path("/opt/bpfwall").exists() and not c.path("/usr/local/bin/bpfwall").exists()
    assert c.exec(["sh", "-c", "command -v bpfwall"], check=True).stdout.strip() == "/usr/bin/bpfwall"
    where = c.exec(["python3", "-c", "import bpfwall, bpfwall.build as b; print(bpfwall.__file__, b.source_dir())"],
                   check=True).stdout.split()
    assert where == ["/usr/lib/python3/dist-packages/bpfwall/__init__.py", "/usr/share/bpfwall/bpf"]
    for unit in ("bpfwall.service", "bpfwall-metrics.timer"):
        assert c.systemctl("is-enabled", unit).stdout.strip() == "disabled", unit
        assert c.systemctl("is-active", unit).stdout.strip() == "inactive", unit
    assert c.bpfwall("list", check=True).stdout == "no units loaded\n"
    assert list(c.path("/etc/bpfwall").iterdir()) == []
    # The units as shipped: /usr/bin, and systemd accepts them.
    assert "path=/usr/bin/bpfwall" in c.show("bpfwall.service", "ExecStart")["ExecStart"]
    verify = c.exec(["systemd-analyze", "verify", "--man=no", "bpfwall.service", "bpfwall@x.service.service"])
    assert (verify.returncode, verify.stderr) == (0, ""), verify.stderr


def test_handoff_through_the_shipped_template_and_its_reload(c):
    svc = unique("deb-handoff")
    write_policy(c, {svc: "udp && local_port == 5001"})
    install_unit(c, svc, receiver_unit(svc, [5001, 5002]))
    c.bpfwall("dropin", svc, check=True)  # Requires=bpfwall@SVC.service, IPIngressFilterPath=
    c.systemctl("start", svc, check=True)
    try:
        loader = f"bpfwall@{svc}.service"
        assert c.show(loader, "ActiveState", "FragmentPath") == {
            "ActiveState": "active", "FragmentPath": "/lib/systemd/system/bpfwall@.service"}
        pin = c.bpfwall("path", svc, "ingress", check=True).stdout.strip()
        first = pinned_prog_id(c, pin)
        assert first in receiver_state(c, svc)["ingress_at_start"]  # attached before its first process
        send_udp(c, {5001: N, 5002: N})
        assert wait_counts(c, svc, {5001: N}) == {5001: N, 5002: 0}

        # A changed policy, live: the loader's reload swaps the program; the service keeps running.
        pid = c.show(svc, "MainPID")["MainPID"]
        write_policy(c, {svc: "udp && local_port == 5002"})
        c.systemctl("reload", loader, check=True)
        second = pinned_prog_id(c, pin)
        assert second != first and cgroup.query(c.unit_cgroup(svc), "ingress")[1] == [second]
        assert c.show(svc, "MainPID")["MainPID"] == pid
        send_udp(c, {5001: N, 5002: N})
        assert wait_counts(c, svc, {5001: N, 5002: N}) == {5001: N, 5002: N}
        stats = bpfwall_stats(c, svc)
        # The counters survive the swap: N passed and N dropped before it, and as many after.
        assert (packets(stats, "ingress", "pass"), packets(stats, "ingress", "drop")) == (2 * N, 2 * N)
    finally:
        c.systemctl("stop", svc, f"bpfwall@{svc}.service")
        c.bpfwall("dropin", svc, "--remove")


def test_the_shipped_watcher_polices_and_reloads(c, built_deb):
    svc = unique("deb-watched")
    write_policy(c, {svc: "udp && local_port == 6001"})
    install_unit(c, svc, receiver_unit(svc, [6001, 6002]))
    c.systemctl("enable", "--now", "bpfwall.service", check=True)
    try:
        c.systemctl("start", svc, check=True)
        pin = c.bpfwall("path", svc, "ingress", check=True).stdout.strip()
        host_cg = c.unit_cgroup(svc)
        wait_attached(host_cg, pinned_prog_id(c, pin))
        send_udp(c, {6001: N, 6002: N})
        assert wait_counts(c, svc, {6001: N}) == {6001: N, 6002: 0}

        old = pinned_prog_id(c, pin)
        write_policy(c, {svc: "udp && local_port == 6002"})
        c.systemctl("reload", "bpfwall.service", check=True)
        new = _wait_pin_changes(c, pin, old)
        wait_attached(host_cg, new)
        send_udp(c, {6001: N, 6002: N})
        assert wait_counts(c, svc, {6001: N, 6002: N}) == {6001: N, 6002: N}

        # An upgrade (here: the same version again) restarts the running watcher and unloads nothing.
        watcher_pid = c.show("bpfwall.service", "MainPID")["MainPID"]
        c.sh(f"cd /var/tmp && apt install -y --reinstall ./{built_deb.name}", timeout=300, check=True)
        after = c.show("bpfwall.service", "ActiveState", "MainPID")
        assert after["ActiveState"] == "active" and after["MainPID"] != watcher_pid
        assert cgroup.query(host_cg, "ingress")[1] == [new] and pinned_prog_id(c, pin) == new
    finally:
        c.systemctl("stop", svc)
        c.systemctl("disable", "--now", "bpfwall.service")
        c.bpfwall("unload", "--all")


def _wait_pin_changes(c, pin: str, old: int, timeout: float = 20) -> int:
    import time

    deadline = time.monotonic() + timeout
    while (now := pinned_prog_id(c, pin)) == old:
        assert time.monotonic() < deadline, f"the watcher did not swap {pin} after the reload"
        time.sleep(0.05)
    return now


def test_purge_unloads_what_bpfwall_loaded_and_keeps_the_policy(systemd_rootfs, built_deb):
    c = boot_with_package(systemd_rootfs, built_deb)
    try:
        handed, watched = unique("deb-purge-h"), unique("deb-purge-w")
        ports = {handed: [7001, 7002], watched: [7003, 7004]}  # each passes only its first port
        write_policy(c, {svc: f"udp && local_port == {p[0]}" for svc, p in ports.items()})
        policy_before = c.path(POLICY).read_bytes()
        for svc, p in ports.items():
            install_unit(c, svc, receiver_unit(svc, p))
        c.bpfwall("dropin", handed, check=True)
        c.systemctl("enable", "--now", "bpfwall.service", check=True)
        c.systemctl("start", handed, watched, check=True)
        cgroups = {svc: c.unit_cgroup(svc) for svc in (handed, watched)}
        wait_attached(cgroups[watched], pinned_prog_id(c, c.bpfwall("path", watched, "ingress", check=True)
                                                           .stdout.strip()))
        assert all(cgroup.query(cg, "ingress")[1] for cg in cgroups.values())
        send_udp(c, {p: N for p in (7001, 7002, 7003, 7004)})
        assert wait_counts(c, handed, {7001: N}) == {7001: N, 7002: 0}
        assert wait_counts(c, watched, {7003: N}) == {7003: N, 7004: 0}
        assert c.path("/var/cache/bpfwall").is_dir()

        c.exec(["apt-get", "purge", "-y", "bpfwall"], timeout=300, check=True)

        assert {svc: cgroup.query(cg, "ingress")[1] for svc, cg in cgroups.items()} == {handed: [], watched: []}
        assert list(Path(c.bpffs_dir).rglob("*")) == []  # the container's /sys/fs/bpf: no pins, no pin root
        assert c.exec(["test", "-e", "/run/bpfwall"]).returncode == 1
        send_udp(c, {p: N for p in (7001, 7002, 7003, 7004)})  # nothing filters them now
        assert wait_counts(c, handed, {7001: 2 * N, 7002: N}) == {7001: 2 * N, 7002: N}
        assert wait_counts(c, watched, {7003: 2 * N, 7004: N}) == {7003: 2 * N, 7004: N}
        # The admin's services keep running; the watcher and its unit are gone.
        assert c.show(watched, "ActiveState")["ActiveState"] == "active"
        assert c.show("bpfwall.service", "LoadState", "ActiveState") == {"LoadState": "not-found",
                                                                          "ActiveState": "inactive"}
        assert not c.path("/etc/systemd/system/sysinit.target.wants/bpfwall.service").exists()
        # The admin's policy stays as it was; the package's own files and caches are gone.
        assert c.path(POLICY).read_bytes() == policy_before
        assert not c.path("/usr/bin/bpfwall").exists() and not c.path("/var/cache/bpfwall").exists()
        assert c.exec(["dpkg-query", "-W", "-f=${Status}", "bpfwall"]).stdout in ("", "unknown ok not-installed")
    finally:
        c.stop()
