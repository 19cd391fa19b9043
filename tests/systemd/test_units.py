"""The shipped unit files under a real systemd (252, Debian 12): they parse, the watcher runs
with its sandbox actually in force, and it is an early-boot service: boot waits for its READY.

The exposure score of `systemd-analyze security` is printed next to the score of
a plain unit measured in the same run (the baseline), so the report reads as a
comparison and not as a bare number.
"""
from __future__ import annotations

import re

import pytest

from tests.systemd.container import REPO, REPO_MOUNT
from tests.systemd import container as ct
from tests.systemd.services import attached, pin_path, pinned_prog_id, wait_attached

pytestmark = [pytest.mark.kernel, pytest.mark.systemd]

UNITS = ("bpfwall.service", "bpfwall@.service")
WATCHER_CAPS = {"cap_bpf", "cap_perfmon", "cap_net_admin"}


@pytest.fixture(scope="module")
def c(container):
    for unit in UNITS:
        container.write(f"/etc/systemd/system/{unit}", (REPO / "units" / unit).read_text())
    container.write("/etc/bpfwall/50-units-test.toml", '[units."nothing-here.service"]\ningress = "false"\n')
    container.write("/etc/systemd/system/plain.service", "[Service]\nExecStart=/usr/bin/sleep infinity\n")
    container.systemctl("daemon-reload", check=True)
    return container


def test_units_pass_systemd_analyze_verify(c):
    # --man=no: the minimal tree has no man pages for Documentation=man:… to resolve.
    proc = c.exec(["systemd-analyze", "verify", "--man=no", "bpfwall.service", "bpfwall@nginx.service.service"])
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr


def capabilities(c, mask_hex: str) -> set[str]:
    out = c.exec(["capsh", f"--decode={mask_hex}"], check=True).stdout.strip()
    return set(out.split("=", 1)[1].split(",")) if "=" in out else set()


def test_watcher_runs_with_its_sandbox_in_force(c):
    c.systemctl("start", "bpfwall.service", check=True)  # Type=notify: returns after READY=1
    try:
        props = c.show("bpfwall.service", "ActiveState", "SubState", "MainPID")
        assert (props["ActiveState"], props["SubState"]) == ("active", "running")
        status = dict(line.split(":", 1) for line in
                      c.exec(["cat", f"/proc/{props['MainPID']}/status"], check=True).stdout.splitlines())
        # What the kernel enforces on the running watcher, not just what the unit asks for.
        assert capabilities(c, status["CapBnd"].strip()) == WATCHER_CAPS
        assert status["NoNewPrivs"].strip() == "1"
        assert status["Seccomp"].strip() == "2"  # a seccomp filter is installed
        # mountinfo: "ID PARENT DEV ROOT MOUNTPOINT OPTIONS …"; the last mount on a point is the visible one
        options = {f[4]: f[5].split(",") for f in (line.split() for line in c.exec(
            ["cat", f"/proc/{props['MainPID']}/mountinfo"], check=True).stdout.splitlines())}
        assert "ro" in options["/"] and "ro" in options["/proc/sys"]  # ProtectSystem=strict, ReadOnlyPaths=
        assert "rw" in options["/sys/fs/bpf"]                         # ReadWritePaths=: pins
    finally:
        c.systemctl("stop", "bpfwall.service")


def exposure(c, unit: str) -> float:
    out = c.exec(["systemd-analyze", "security", "--no-pager", unit], check=True).stdout
    m = re.search(rf"Overall exposure level for {re.escape(unit)}: ([0-9.]+)", out)
    assert m, out[-500:]
    return float(m.group(1))


def test_watcher_exposure_is_recorded_against_a_plain_unit(c, record_property):
    ours, plain = exposure(c, "bpfwall.service"), exposure(c, "plain.service")
    record_property("exposure_bpfwall_service", ours)
    record_property("exposure_plain_service", plain)
    print(f"\nsystemd-analyze security: bpfwall.service {ours} vs a plain unit {plain} "
          f"(0 = fully sandboxed, 10 = not at all)")
    assert ours < plain


# -- the drop-in under a real systemd ------------------------------------------------

PROBE = "bpfwall-nftprobe.service"
# What the nft worker does first (bpfwall/nft/worker.py): unshare a mount namespace, make / private,
# mount cgroup2 at /sys/fs/cgroup. The container is unified (cgroup2 already at /sys/fs/cgroup, where
# mounting it again is EBUSY), so the probe first lays a hybrid host's tmpfs over /sys/fs/cgroup in a
# namespace of its own: the same system calls, each needing what the drop-in grants. The container's
# python has no nftables module, so the probe stops there; the rest of the worker needs nothing the
# watcher lacks (netlink, CAP_NET_ADMIN).
PROBE_SCRIPT = """import ctypes, os
from bpfwall.nft import worker
libc = ctypes.CDLL(None, use_errno=True)
for ok, what in ((lambda: libc.unshare(worker.CLONE_NEWNS), "unshare"),
                 (lambda: libc.mount(b"none", b"/", None, worker.MS_REC | worker.MS_PRIVATE, None), "private /"),
                 (lambda: libc.mount(b"tmpfs", b"/sys/fs/cgroup", b"tmpfs", 0, None), "tmpfs")):
    if ok() != 0:
        raise OSError(ctypes.get_errno(), what + ": " + os.strerror(ctypes.get_errno()))
worker.enter_private_cgroup2_view()
print("cgroup2 mounted:", os.path.exists("/sys/fs/cgroup/cgroup.controllers"))
"""
PROBE_DROPIN = f"""[Service]
Type=oneshot
Restart=no
Environment=PYTHONPATH={REPO_MOUNT} PYTHONDONTWRITEBYTECODE=1
ExecStart=
ExecStart=/usr/bin/python3 /usr/local/lib/bpfwall-nftprobe.py
"""


def test_the_dropin_gives_the_nft_worker_what_it_needs(container):
    """The shipped bpfwall.service's sandbox (under another name, running the worker's first steps)
    refuses the worker's mount namespace; with units/examples/bpfwall.service.d/nft-hybrid.conf it works."""
    c = container
    c.write(f"/etc/systemd/system/{PROBE}", (REPO / "units" / "bpfwall.service").read_text())
    c.write(f"/etc/systemd/system/{PROBE}.d/probe.conf", PROBE_DROPIN)
    c.write("/usr/local/lib/bpfwall-nftprobe.py", PROBE_SCRIPT)
    c.systemctl("daemon-reload", check=True)
    refused = c.systemctl("start", PROBE)
    assert refused.returncode != 0
    assert "Operation not permitted" in c.journal(PROBE)
    c.write(f"/etc/systemd/system/{PROBE}.d/nft-hybrid.conf",
            (REPO / "units" / "examples" / "bpfwall.service.d" / "nft-hybrid.conf").read_text())
    c.systemctl("daemon-reload", check=True)
    c.systemctl("reset-failed", PROBE)
    done = c.systemctl("start", PROBE)
    assert done.returncode == 0, c.journal(PROBE)
    assert c.show(PROBE, "Result")["Result"] == "success"
    assert "cgroup2 mounted: True" in c.journal(PROBE)
    verify = c.exec(["systemd-analyze", "verify", "--man=no", PROBE])
    assert verify.returncode == 0, verify.stderr


def test_watcher_is_ordered_as_an_early_boot_service(c):
    """As systemd sees it: before sysinit.target (which every ordinary service waits for), after
    what it needs mounted and running, and out of the way at shutdown."""
    props = c.show("bpfwall.service", "DefaultDependencies", "Before", "After", "Conflicts", "RequiresMountsFor")
    before, after = set(props["Before"].split()), set(props["After"].split())
    assert props["DefaultDependencies"] == "no"
    assert {"sysinit.target", "shutdown.target"} <= before and props["Conflicts"].split() == ["shutdown.target"]
    # bpffs; /usr and /var (local-fs.target); the journal; /tmp and /var/tmp set up (PrivateTmp=)
    assert {"sys-fs-bpf.mount", "local-fs.target", "systemd-journald.socket",
            "systemd-tmpfiles-setup.service"} <= after, after
    assert {"/run/bpfwall", "/var/cache/bpfwall"} <= set(props["RequiresMountsFor"].split())
    # Nothing it waits for may wait for sysinit.target itself: that would be an ordering cycle.
    assert not after & {"sysinit.target", "basic.target", "sockets.target", "network.target", "dbus.service"}
    for unit in after:
        theirs = c.systemctl("show", "--property=After", "--value", "--", unit, check=True).stdout.split()
        assert "sysinit.target" not in theirs, unit


POLICED = "policed.service"


def _enable_at_boot(c) -> None:
    """bpfwall.service as shipped, enabled (its [Install]: sysinit.target), and a service of
    multi-user.target that the policy polices."""
    c.write("/etc/systemd/system/bpfwall.service", (REPO / "units" / "bpfwall.service").read_text())
    c.write(f"/etc/systemd/system/{POLICED}",
            "[Service]\nExecStart=/usr/bin/sleep infinity\n\n[Install]\nWantedBy=multi-user.target\n")
    c.write("/etc/bpfwall/50-boot-test.toml", f'[units."{POLICED}"]\ningress = "udp"\n')
    for unit, target in (("bpfwall.service", "sysinit.target"), (POLICED, "multi-user.target")):
        link = c.path(f"/etc/systemd/system/{target}.wants/{unit}")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(f"../{unit}")


def test_boot_waits_for_the_watchers_ready(systemd_rootfs):
    """A boot with the watcher enabled: it is READY (Type=notify: active) before sysinit.target is
    reached, the policed service starts after that with its filter on, and no ordering cycle."""
    with ct.Container(systemd_rootfs, REPO, before_boot=_enable_at_boot) as c:
        watcher, sysinit, policed = (
            c.show(u, "ActiveState", "SubState", "ActiveEnterTimestampMonotonic", "ExecMainStartTimestampMonotonic")
            for u in ("bpfwall.service", "sysinit.target", POLICED))
        assert (watcher["ActiveState"], watcher["SubState"], policed["ActiveState"]) == ("active", "running", "active")
        ready = int(watcher["ActiveEnterTimestampMonotonic"])
        assert 0 < ready <= int(sysinit["ActiveEnterTimestampMonotonic"]) <= int(policed["ExecMainStartTimestampMonotonic"])
        wait_attached(c.unit_cgroup(POLICED), pinned_prog_id(c, pin_path(c, POLICED)))
        assert attached(c.unit_cgroup(POLICED), "egress") == []
        boot_log = c.journal(None, "-b")
        assert "ordering cycle" not in boot_log.lower() and "bpfwall.service: Failed" not in boot_log
