"""units/bpfwall-metrics.service and .timer under a real systemd (252): they parse, the service
runs with its sandbox and writes node_exporter's textfile with the loaded units' counters, and
the timer starts it."""
from __future__ import annotations

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.systemd.container import REPO

pytestmark = [pytest.mark.kernel, pytest.mark.systemd]

UNITS = ("bpfwall-metrics.service", "bpfwall-metrics.timer")
TEXTFILE_DIR = "/var/lib/prometheus/node-exporter"
TEXTFILE = f"{TEXTFILE_DIR}/bpfwall.prom"
UNIT = "metered.service"


@pytest.fixture(scope="module")
def c(container):
    for unit in UNITS:
        container.write(f"/etc/systemd/system/{unit}", (REPO / "units" / unit).read_text())
    container.systemctl("daemon-reload", check=True)
    container.exec(["mkdir", "-p", TEXTFILE_DIR], check=True)
    container.bpfwall("load", UNIT, "--ingress", "udp && dst_port == $port", "--param", "port=53",
                      "--egress", "true", check=True)
    return container


def samples(text: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_metrics_units_pass_systemd_analyze_verify(c):
    proc = c.exec(["systemd-analyze", "verify", "--man=no", *UNITS])
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr


def test_the_service_writes_the_textfile_with_the_units_counters(c):
    c.exec(["rm", "-f", TEXTFILE])
    done = c.systemctl("start", "bpfwall-metrics.service")
    assert done.returncode == 0, c.journal("bpfwall-metrics.service")
    assert c.show("bpfwall-metrics.service", "Result")["Result"] == "success"
    got = samples(c.exec(["cat", TEXTFILE], check=True).stdout)
    labels = (("backend", "bpf"), ("direction", "ingress"), ("unit", UNIT), ("verdict", "pass"))
    assert ("bpfwall_packets_total", labels) in got, sorted(got)
    assert got[("bpfwall_param", (("backend", "bpf"), ("name", "port"), ("unit", UNIT)))] == 53
    # node_exporter (another user) reads it; no temporary file is left beside it
    listing = c.exec(["ls", "-l", TEXTFILE_DIR], check=True).stdout.split("\n", 1)[1].splitlines()
    assert len(listing) == 1 and listing[0].startswith("-rw-r--r--") and listing[0].endswith("bpfwall.prom"), listing


def test_the_service_runs_with_its_sandbox_in_force(c):
    """Write access is the textfile directory alone: a service that tries another (same sandbox)
    is refused, so the hardening is in force, not only written down."""
    probe = "bpfwall-metrics-probe.service"
    text = (REPO / "units" / "bpfwall-metrics.service").read_text().replace(
        "ExecStart=/usr/local/bin/bpfwall metrics --textfile /var/lib/prometheus/node-exporter/bpfwall.prom",
        "ExecStart=/usr/local/bin/bpfwall metrics --textfile /var/lib/bpfwall-probe.prom")
    c.write(f"/etc/systemd/system/{probe}", text)
    c.systemctl("daemon-reload", check=True)
    assert c.systemctl("start", probe).returncode != 0
    assert "Read-only file system" in c.journal(probe)


def test_the_timer_runs_the_service(c):
    c.exec(["rm", "-f", TEXTFILE])
    c.systemctl("start", "bpfwall-metrics.timer", check=True)
    try:
        deadline = time.monotonic() + 20
        while c.exec(["test", "-s", TEXTFILE]).returncode != 0:
            assert time.monotonic() < deadline, c.journal("bpfwall-metrics.service")
            time.sleep(0.2)
        assert "bpfwall_packets_total" in c.exec(["cat", TEXTFILE], check=True).stdout
    finally:
        c.systemctl("stop", "bpfwall-metrics.timer")
