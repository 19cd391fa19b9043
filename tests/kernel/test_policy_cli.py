"""`bpfwall policy …` and `bpfwall import-scnpm` as users run them (subprocess), and policy entries
loaded into the real kernel: what the policy promises is what the program does."""
from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import textwrap
import uuid

import pytest

from bpfwall.backends import bpf
from bpfwall.kernel.cgroup import cgroup2_mount
from bpfwall.lang.evaluator import evaluate
from bpfwall.lang.packet import parse_packet
from bpfwall.policy import load_policy
from tests.kernel.invoke import PYTHON, bpfwall

pytestmark = pytest.mark.kernel

GOOD = """
[defaults]
mode = "audit"

[units."nginx.service"]
ingress = "tcp && local_port in {80, 443, $admin_port} || saddr in @admins"
params = { admin_port = 8443 }
sets = { admins = ["10.0.0.0/8", "2001:db8::/32"] }

[units."app-*.scope"]
cgroup = "user@*.service/app.slice/*"
egress = "udp && remote_port == 53 || tcp && remote_port in @web"
sets = { web = ["80", "443", "8000..8100"] }
mode = "enforce"
"""

BAD = """
[units."nginx.service"]
ingres = "tcp"
egress = "dst_port && udp"
params = { port = 80 }

[units."db.service"]
ingress = "tcp && dst_port == $port"
mode = "enforcing"
"""


@pytest.fixture
def policy_dir(trusted_tmp_path):
    d = trusted_tmp_path / "policy"
    d.mkdir()
    (d / "10-good.toml").write_text(GOOD.lstrip("\n"))
    return d


def test_check_summarizes_a_good_policy(policy_dir):
    r = bpfwall("policy", "check", "--policy-dir", str(policy_dir))
    assert (r.returncode, r.stderr) == (0, "")
    f = policy_dir / "10-good.toml"
    assert r.stdout == textwrap.dedent(f"""\
        {policy_dir}: ok, 2 units
          nginx.service  ingress        bpf audit    ({f}:4)
          app-*.scope    egress         bpf enforce  cgroup user@*.service/app.slice/*  ({f}:9)
    """)
    r = bpfwall("policy", "check", "--json", env={"BPFWALL_POLICY_DIR": str(policy_dir)})
    data = json.loads(r.stdout)
    assert r.returncode == 0 and data["ok"] is True and [u["name"] for u in data["units"]] == \
        ["nginx.service", "app-*.scope"]
    assert data["units"][1] == {"name": "app-*.scope", "directions": ["egress"], "backend": "bpf",
                                "mode": "enforce", "cgroup": "user@*.service/app.slice/*", "file": str(f), "line": 9}


def test_check_reports_every_error_one_per_line(policy_dir):
    bad = policy_dir / "20-bad.toml"
    bad.write_text(BAD.lstrip("\n"))
    r = bpfwall("policy", "check", "--policy-dir", str(policy_dir))
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr.splitlines() == [
        f"{bad}:2: units.\"nginx.service\".ingres: unknown key 'ingres'; did you mean 'ingress' or 'egress'?",
        f'{bad}:3: units."nginx.service".egress: column 1: dst_port is a number; compare it, e.g. dst_port == 53',
        f'{bad}:6: units."db.service".params: $port (used by ingress) has no value; add params = {{ port = NUMBER }}',
        f"{bad}:8: units.\"db.service\".mode: must be 'enforce' or 'audit', not 'enforcing'; did you mean 'enforce'?",
        f'{bad}:1: units."nginx.service": nginx.service is already defined at {policy_dir}/10-good.toml:4',
    ]
    r = bpfwall("policy", "check", "--json", str(bad))
    assert r.returncode == 2 and len(json.loads(r.stdout)["errors"]) == 4
    # show and match refuse a broken policy with the first error and a pointer to check
    r = bpfwall("policy", "show", "--policy-dir", str(policy_dir))
    assert r.returncode == 2 and r.stderr == (
        f"bpfwall: error: {bad}:2: units.\"nginx.service\".ingres: unknown key 'ingres'; did you mean 'ingress' "
        "or 'egress'? (and 4 more: bpfwall policy check lists them)\n")


def test_check_never_touches_the_kernel(policy_dir, tmp_path):
    """No bpf(2) call and no other program run (clang, nft): checking is parsing only."""
    if not shutil.which("strace"):
        pytest.skip("strace is not installed")
    trace = tmp_path / "trace"
    pin_root = f"/sys/fs/bpf/bpfwall-test-{uuid.uuid4().hex[:10]}"
    r = bpfwall("policy", "check", "--policy-dir", str(policy_dir), env={"BPFWALL_PIN_ROOT": pin_root},
                prefix=("strace", "-f", "-qq", "-e", "trace=bpf,execve", "-o", str(trace)))
    assert r.returncode == 0, r.stderr
    calls = trace.read_text().splitlines()
    assert [c for c in calls if "bpf(" in c] == []
    assert [c for c in calls if "execve(" in c and PYTHON not in c and "python" not in c] == []
    assert not os.path.exists(pin_root)


def test_show_prints_effective_entries(policy_dir):
    r = bpfwall("policy", "show", "--policy-dir", str(policy_dir))
    f = policy_dir / "10-good.toml"
    assert r.returncode == 0 and r.stdout == textwrap.dedent(f"""\
        nginx.service  ({f}:4)
          backend bpf, mode audit, set_capacity 4096
          ingress: tcp && local_port in {{80, 443, $admin_port}} || saddr in @admins
          $admin_port = 8443
          @admins = {{10.0.0.0/8, 2001:db8::/32}}

        app-*.scope  ({f}:9)
          backend bpf, mode enforce, set_capacity 4096
          cgroup: user@*.service/app.slice/*
          egress: udp && remote_port == 53 || tcp && remote_port in @web
          @web = {{80, 443, 8000..8100}}
    """)
    data = json.loads(bpfwall("policy", "show", "--json", "--policy-dir", str(policy_dir)).stdout)
    assert data[0]["params"] == {"admin_port": 8443} and len(data[0]["fingerprint"]) == 64


def test_match_explains(policy_dir):
    user_app = "user.slice/user-1000.slice/user@1000.service/app.slice"
    r = bpfwall("policy", "match", "--policy-dir", str(policy_dir), f"{user_app}/app-firefox-7.scope")
    f = policy_dir / "10-good.toml"
    assert r.returncode == 0 and r.stdout == (
        f"{user_app}/app-firefox-7.scope → app-*.scope ({f}:9)\n"
        f"  why: glob 'app-*.scope', the first matching glob in file order, cgroup glob "
        f"'user@*.service/app.slice/*' matches ({f}:9)\n")
    # absolute paths under the cgroup2 mount are taken relative to it
    r = bpfwall("policy", "match", "--policy-dir", str(policy_dir), f"{cgroup2_mount()}/system.slice/nginx.service")
    assert r.returncode == 0 and r.stdout.startswith("system.slice/nginx.service → nginx.service (")
    r = bpfwall("policy", "match", "--policy-dir", str(policy_dir), "system.slice/nginx.service/worker")
    assert r.returncode == 1 and "no entry" in r.stdout and "'worker' is not a unit cgroup" in r.stdout
    r = bpfwall("policy", "match", "--json", "--policy-dir", str(policy_dir), "system.slice/app-x.scope")
    data = json.loads(r.stdout)
    assert r.returncode == 1 and data["entry"] is None and data["passed_over"][0]["name"] == "app-*.scope"


def test_missing_policy_dir(trusted_tmp_path):
    r = bpfwall("policy", "check", "--policy-dir", str(trusted_tmp_path / "nope"))
    assert (r.returncode, r.stderr) == (2, f"{trusted_tmp_path}/nope: cannot open the policy directory "
                                           f"{trusted_tmp_path}/nope: No such file or directory\n")


def test_toml_nested_10000_deep_is_one_line_exit_2(policy_dir):
    deep = policy_dir / "20-deep.toml"
    deep.write_text("a = " + "[" * 10000 + "]" * 10000 + "\n")
    r = bpfwall("policy", "check", "--policy-dir", str(policy_dir))
    assert (r.returncode, r.stdout, r.stderr) == (
        2, "", f"{deep}: arrays or inline tables nested too deeply to read (a policy needs two levels at most)\n")


SCNPM = """
table inet filter {
  chain input { type filter hook input priority 0; policy drop; }
  chain output { type filter hook output priority 0; }
}
# postfix.service :: add rule inet filter output \\
#   socket cgroupv2 level 2 "system.slice/postfix.service" tcp dport { 25, 465 } accept
# postfix.service :: add rule inet filter output ip daddr 10.0.0.0/8 drop
# nginx.service :: add rule inet filter input tcp dport { http, https } accept
# nginx.service :: add rule inet filter input ct state established accept
"""


def test_import_scnpm_round_trip(tmp_path, trusted_tmp_path):
    conf = tmp_path / "nftables.conf"
    conf.write_text(SCNPM)
    r = bpfwall("import-scnpm", str(conf))
    assert r.returncode == 2
    assert r.stderr == (f"{conf}:10: cannot translate: ct (connection tracking) is not in bpfwall's language: "
                        "it judges each packet on its own\n")
    r = bpfwall("import-scnpm", str(conf), "--partial")
    assert r.returncode == 0
    out = trusted_tmp_path / "policy"
    out.mkdir()
    (out / "scnpm.toml").write_text(r.stdout)
    check = bpfwall("policy", "check", "--policy-dir", str(out))
    assert check.returncode == 0, check.stderr
    assert "postfix.service  egress" in check.stdout and "nginx.service    ingress" in check.stdout
    entries = {e.name: e for e in load_policy(str(out)).entries}
    assert entries["nginx.service"].program().ingress.text == "tcp && dst_port in {80, 443}"
    assert entries["postfix.service"].cgroup == "system.slice/postfix.service"
    # stdin works too
    r = bpfwall("import-scnpm", "-", "--partial", stdin=SCNPM)
    assert r.returncode == 0 and "[units.\"postfix.service\"]" in r.stdout


# -- a policy entry in the kernel ---------------------------------------------

def _tcp4(src: str, dst: str, sport: int, dport: int) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 0, 0, 5 << 4, 2, 1024, 0, 0)
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0, 64, 6, 0,
                       socket.inet_aton(src), socket.inet_aton(dst)) + tcp


@pytest.mark.usefixtures("no_leaks")
def test_entry_values_load_into_the_kernel_program(policy_dir, cache_dir):
    """Entry.program(), .params and .sets are what the backend takes, and the kernel agrees with the
    reference evaluator on them."""
    nginx = load_policy(str(policy_dir)).entry("nginx.service")
    program = nginx.program()
    packets = [_tcp4("192.168.1.1", "192.168.1.2", 40000, port) for port in (80, 443, 8443, 8444, 22)]
    packets += [_tcp4("10.1.2.3", "192.168.1.2", 40000, 22)]
    verdicts = bpf.test_run(program, "ingress", packets, nginx.params, nginx.sets)
    assert verdicts == [True, True, True, False, False, True]
    for data, verdict in zip(packets, verdicts, strict=True):
        assert evaluate(program.ingress.expr, parse_packet(data), "ingress", nginx.params, nginx.sets) == verdict
