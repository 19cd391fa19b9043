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
