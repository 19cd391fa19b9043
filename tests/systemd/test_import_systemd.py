"""`bpfwall import-systemd UNIT` against a real systemd (252): it reads the unit's
IPAddressAllow=, IPAddressDeny= and RestrictNetworkInterfaces= with `systemctl show` and prints
a policy entry that bpfwall accepts."""
from __future__ import annotations

import pytest

pytestmark = [pytest.mark.kernel, pytest.mark.systemd]

UNITS = {
    "fw-allow.service": "IPAddressAllow=localhost 10.1.2.3/8 fd00::/8\nIPAddressDeny=any\n"
                        "RestrictNetworkInterfaces=lo wg0\n",
    "fw-deny.service": "IPAddressDeny=multicast 192.168.0.0/16\nRestrictNetworkInterfaces=~eth0\n",
    "fw-nothing.service": "IPAddressAllow=10.0.0.0/8\n",
    "fw-plain.service": "",
}


@pytest.fixture(scope="module")
def c(container):
    for unit, settings in UNITS.items():
        container.write(f"/etc/systemd/system/{unit}",
                        f"[Service]\nExecStart=/usr/bin/sleep infinity\n{settings}")
    container.systemctl("daemon-reload", check=True)
    return container


def test_allow_list_with_deny_any_and_interfaces(c):
    proc = c.bpfwall("import-systemd", "fw-allow.service")
    assert proc.returncode == 0, proc.stderr
    body = [line for line in proc.stdout.splitlines() if not line.startswith("#")]
    assert body == [
        '[units."fw-allow.service"]',
        # systemd shows its networks (localhost and any expanded, host bits masked, sorted);
        # the pairs that make a name are written as the name again
        'ip_address_allow = ["localhost", "10.0.0.0/8", "fd00::/8"]',
        'ip_address_deny = ["any"]',
        'ingress = "ifname in {\\"lo\\", \\"wg0\\"}"',
        'egress = "ifname in {\\"lo\\", \\"wg0\\"}"',
    ], proc.stdout
    # what it prints is a policy bpfwall accepts, as it is
    c.write("/etc/bpfwall/fw-allow.toml", proc.stdout)
    check = c.bpfwall("policy", "check", "/etc/bpfwall/fw-allow.toml")
    assert check.returncode == 0, check.stdout + check.stderr


def test_deny_list_and_interfaces_to_avoid(c):
    proc = c.bpfwall("import-systemd", "fw-deny.service")
    assert proc.returncode == 0, proc.stderr
    assert 'ip_address_deny = ["multicast", "192.168.0.0/16"]' in proc.stdout.splitlines(), proc.stdout
    assert 'egress = "!(ifname in {\\"eth0\\"})"' in proc.stdout.splitlines()


@pytest.mark.parametrize("unit,message", [
    ("fw-nothing.service", "fw-nothing.service has IPAddressAllow= alone (it lets every packet pass): nothing to import"),
    ("fw-plain.service", "fw-plain.service has no IPAddressDeny= and no RestrictNetworkInterfaces=: nothing to import"),
    ("no-such.service", "systemd has no unit no-such.service"),
])
def test_nothing_to_import_is_one_line_and_status_2(c, unit, message):
    proc = c.bpfwall("import-systemd", unit)
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", f"bpfwall: error: {message}\n")


# -- the same verdicts as systemd's own firewall, on real packets ------------------------------

PROBE = "/usr/local/lib/bpfwall-test/udp_probe.py"
PROBE_SOURCE = """import json, socket, sys
out = {}
for target in sys.argv[1:]:
    with socket.socket(socket.AF_INET6 if ":" in target else socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.sendto(b"x", (target, 9))
            out[target] = "pass"
        except PermissionError:  # a cgroup egress drop
            out[target] = "drop"
print(json.dumps(out))
"""
TARGETS = ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.1.2.3", "::1", "fd00::1", "fd00::2"]
CASES = [  # (IPAddressAllow=, IPAddressDeny=)
    ("127.0.0.2 fd00::/16", "any"),
    ("", "127.0.0.0/8"),
    ("127.0.0.0/8", "127.0.0.1 ::1"),     # allow wins over deny
    ("localhost", "any"),
    ("fd00::1", "fd00::/64 127.0.0.3/32"),
]


@pytest.fixture(scope="module")
def probe(c):
    c.write(PROBE, PROBE_SOURCE)
    for addr in ("fd00::1", "fd00::2"):
        c.exec(["ip", "-6", "addr", "add", f"{addr}/128", "dev", "lo", "nodad"], check=True)
    return c


def verdicts(proc) -> dict:
    import json

    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("allow,deny", CASES)
def test_same_verdicts_as_systemds_firewall(probe, allow, deny):
    from bpfwall.policy.schema import check_document

    c = probe
    unit = f"fw-case-{CASES.index((allow, deny))}.service"
    c.write(f"/etc/systemd/system/{unit}", "[Service]\nExecStart=/usr/bin/true\n"
            + (f"IPAddressAllow={allow}\n" if allow else "") + f"IPAddressDeny={deny}\n")
    c.systemctl("daemon-reload", check=True)
    systemds = verdicts(c.systemd_run("--wait", "--pipe", "-p", f"IPAddressAllow={allow}",
                                      "-p", f"IPAddressDeny={deny}", "--", "python3", PROBE, *TARGETS))
    imported = c.bpfwall("import-systemd", unit)
    assert imported.returncode == 0, imported.stderr
    egress = check_document("imported.toml", imported.stdout).entries[0].egress
    ours = verdicts(c.systemd_run("--wait", "--pipe", "--", "bpfwall", "run", "--egress", egress, "--",
                                  "python3", PROBE, *TARGETS))
    assert ours == systemds, f"{egress}\nsystemd: {systemds}\nbpfwall: {ours}"
    assert "drop" in systemds.values() and "pass" in systemds.values()  # each case decides both ways
