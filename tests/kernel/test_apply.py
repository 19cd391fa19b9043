"""`bpfwall apply UNIT` (the loader unit's ExecStart) and `make install`."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from bpfwall.backends import bpf
from bpfwall.cli import main

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]

POLICY = """
[units."web.service"]
ingress = "tcp && local_port in {80, $admin}"
egress = "udp && remote_port == 53 || remote_addr in @peers"
params = { admin = 8443 }
sets = { peers = ["10.0.0.0/8"] }

[units."job-*.service"]
egress = "tcp"
mode = "audit"

[units."via-nft.service"]
backend = "nft"
ingress = "tcp"
"""


@pytest.fixture
def policy_dir(trusted_tmp_path):
    d = trusted_tmp_path / "policy"
    d.mkdir()
    (d / "10-test.toml").write_text(POLICY)
    return d


def _cli(capsys, *args) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_apply_pins_the_entry_where_bpfwall_path_says(no_leaks, pin_root, policy_dir, capsys):
    rc, out, err = _cli(capsys, "apply", "web.service", "--policy-dir", str(policy_dir))
    assert rc == 0, err
    assert f"applied web.service ({policy_dir}/10-test.toml:2) to web.service [enforce]" in out
    for d in bpf.DIRECTIONS:
        assert os.path.exists(bpf.prog_path(pin_root, "web.service", d))
    s = bpf.stats(pin_root, "web.service")
    assert s["ingress"] == "tcp && local_port in {80, $admin}"
    assert s["params"] == {"admin": 8443} and s["sets"] == {"peers": ["10.0.0.0/8"]}
    assert s["mode"] == "enforce"
    rc, out, err = _cli(capsys, "unload", "web.service")
    assert rc == 0 and bpf.units(pin_root) == []


def test_apply_again_swaps_in_place_where_attached(no_leaks, pin_root, policy_dir, temp_cgroup, capsys):
    """ExecReload=bpfwall apply %i: a changed policy reaches the running unit with no gap."""
    assert _cli(capsys, "apply", "web.service", "--policy-dir", str(policy_dir))[0] == 0
    bpf.attach(pin_root, "web.service", temp_cgroup.path)
    (policy_dir / "10-test.toml").write_text(POLICY.replace("{80, $admin}", "{80, 443, $admin}"))
    rc, out, err = _cli(capsys, "apply", "web.service", "--policy-dir", str(policy_dir))
    assert rc == 0, err
    assert "replaced in place on 2 attachment(s)" in out
    s = bpf.stats(pin_root, "web.service")
    assert s["ingress"] == "tcp && local_port in {80, 443, $admin}"
    assert sorted(a["direction"] for a in s["attached"] if a["cgroup"] == temp_cgroup.path) == ["egress", "ingress"]
    bpf.unload(pin_root, "web.service")


def test_apply_a_glob_entry_pins_under_the_units_own_name(no_leaks, pin_root, policy_dir, capsys):
    rc, out, err = _cli(capsys, "apply", "job-7.service", "--policy-dir", str(policy_dir), "--json")
    assert rc == 0, err
    assert bpf.units(pin_root) == ["job-7.service"]
    s = bpf.stats(pin_root, "job-7.service")
    assert (s["ingress"], s["egress"], s["mode"]) == (None, "tcp", "audit")
    assert not os.path.exists(bpf.prog_path(pin_root, "job-7.service", "ingress"))
    bpf.unload(pin_root, "job-7.service")


@pytest.mark.parametrize("unit, words", [
    ("other.service", "no policy entry for other.service"),
    ("via-nft.service", "nft backend"),
    ("bad/unit.service", "character '/'"),
])
def test_apply_errors_pin_nothing(no_leaks, pin_root, policy_dir, capsys, unit, words):
    rc, _, err = _cli(capsys, "apply", unit, "--policy-dir", str(policy_dir))
    assert rc == 2 and words in err, err
    assert bpf.units(pin_root) == []


def test_apply_with_a_broken_policy_pins_nothing(no_leaks, pin_root, policy_dir, capsys):
    (policy_dir / "20-bad.toml").write_text('[units."x.service"]\negress = "udp && dst_port == 70000"\n')
    rc, _, err = _cli(capsys, "apply", "web.service", "--policy-dir", str(policy_dir))
    assert rc == 2 and "20-bad.toml:2" in err, err
    assert bpf.units(pin_root) == []


# -- make install ------------------------------------------------------------------

def _installed(stage: Path, *args, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return subprocess.run([str(stage / "usr/local/bin/bpfwall"), *args], capture_output=True, text=True,
                          cwd="/", env=env, **kw)


def test_make_install_with_destdir_is_complete_and_runs(tmp_path, cache_dir):
    stage = tmp_path / "stage"
    make = subprocess.run(["make", "-s", "install", f"DESTDIR={stage}"], cwd=REPO, capture_output=True, text=True)
    assert make.returncode == 0, make.stderr
    for path in ("usr/local/bin/bpfwall", "usr/local/lib/bpfwall/bpfwall/cli.py",
                 "usr/local/lib/bpfwall/bpfwall/bpf/port_filter.c",
                 "usr/local/lib/systemd/system/bpfwall.service", "usr/local/lib/systemd/system/bpfwall@.service",
                 "usr/local/lib/systemd/system/bpfwall-metrics.service",
                 "usr/local/lib/systemd/system/bpfwall-metrics.timer",
                 "usr/local/share/doc/bpfwall/examples/units/nginx.service.d/bpfwall.conf",
                 "usr/local/share/doc/bpfwall/examples/units/bpfwall.service.d/nft-hybrid.conf",
                 "etc/bpfwall/50-example.toml.example"):
        assert (stage / path).is_file(), path
    assert os.access(stage / "usr/local/bin/bpfwall", os.X_OK)
    # The installed tree runs on its own: Debian's python3, its own package and C source.
    assert _installed(stage, "--help").returncode == 0
    check = _installed(stage, "check", "udp&&dst_port==53")
    assert (check.returncode, check.stdout) == (0, "udp && dst_port == 53\n"), check.stderr
    where = subprocess.run(["/usr/bin/python3", "-I", "-c",
                            "import sys; sys.path.insert(0, sys.argv[1]); import bpfwall.build as b; "
                            "print(b.source_dir())", str(stage / "usr/local/lib/bpfwall")],
                           capture_output=True, text=True, cwd="/")
    assert where.stdout.strip() == str(stage / "usr/local/lib/bpfwall/bpfwall/bpf"), where.stderr
    udp53 = "4500001c00000000401100000a0000010a0000029c40003500080000"
    test = _installed(stage, "test", "udp && dst_port == 53", "--hex", udp53, "--cache-dir", str(cache_dir))
    assert (test.returncode, test.stdout) == (0, "pass\n"), test.stderr
    unit = (stage / "usr/local/lib/systemd/system/bpfwall@.service").read_text()
    assert "ExecStart=/usr/local/bin/bpfwall apply %i" in unit

    # An existing policy example is kept; uninstall removes ours and nothing else.
    (stage / "etc/bpfwall/50-example.toml.example").write_text("# mine\n")
    (stage / "etc/bpfwall/10-site.toml").write_text("")
    assert subprocess.run(["make", "-s", "install", f"DESTDIR={stage}"], cwd=REPO, capture_output=True).returncode == 0
    assert (stage / "etc/bpfwall/50-example.toml.example").read_text() == "# mine\n"
    un = subprocess.run(["make", "-s", "uninstall", f"DESTDIR={stage}"], cwd=REPO, capture_output=True, text=True)
    assert un.returncode == 0, un.stderr
    left = sorted(str(p.relative_to(stage)) for p in stage.rglob("*") if p.is_file())
    assert left == ["etc/bpfwall/10-site.toml"]
