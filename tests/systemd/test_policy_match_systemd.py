"""What `bpfwall policy match|show --effective|check` say about a real systemd's tree: systemd's
own IP firewall programs (IPAddressDeny=) are named systemd's, and a deny-all default on
system.slice names the running service it would cut off (the sshd case)."""
from __future__ import annotations

import json

import pytest

from tests.kernel.invoke import bpfwall
from tests.systemd.services import unique

pytestmark = [pytest.mark.kernel, pytest.mark.systemd]


@pytest.fixture(scope="module")
def service(container):
    """A running service that systemd firewalls itself (IPAddressDeny=any: sd_fw_ingress/egress)."""
    name = unique("sshd-like")
    container.systemd_run("--unit", name, "-p", "IPAddressDeny=any", "sleep", "600", check=True)
    try:
        yield name
    finally:
        container.systemctl("stop", name)


def test_match_names_systemds_programs_and_check_names_the_cut_off_unit(container, service, trusted_tmp_path):
    policy = trusted_tmp_path / "policy"
    policy.mkdir()
    (policy / "50-deny.toml").write_text('[units."system.slice"]\negress = "false"\n')
    root = container.payload_cgroup
    rel = f"system.slice/{service}"
    r = bpfwall("policy", "match", "--json", "--policy-dir", str(policy), "--cgroup-root", root, rel)
    assert r.returncode == 0, r.stderr
    view = json.loads(r.stdout)
    assert (view["judgement"]["egress"]["how"], view["judgement"]["egress"]["judge"]["cgroup"]) == \
        ("default", "system.slice")
    own = view["path"][-1]
    assert own["cgroup"] == rel
    found = {(d, p["name"], p["owner"]) for d, ps in own["programs"].items() for p in ps}
    assert {("ingress", "sd_fw_ingress", "systemd"), ("egress", "sd_fw_egress", "systemd")} <= found

    text = bpfwall("policy", "match", "--policy-dir", str(policy), "--cgroup-root", root, rel).stdout
    assert "sd_fw_egress (systemd)" in text

    effective = json.loads(bpfwall("policy", "show", "--effective", "--json", "--policy-dir", str(policy),
                                   "--cgroup-root", root).stdout)
    row = next(r for r in effective if r["cgroup"] == rel)
    assert row["populated"] and row["egress"]["drops_everything"] and row["egress"]["at"] == "system.slice"

    r = bpfwall("policy", "check", "--policy-dir", str(policy), "--cgroup-root", root)
    assert r.returncode == 0
    cut = [line for line in r.stderr.splitlines() if "cuts off" in line]
    assert len(cut) == 1 and cut[0].startswith(f"{policy}/50-deny.toml:1: warning: units.\"system.slice\": the egress "
                                               "default drops every packet, and system.slice holds ")
    assert service in cut[0]
