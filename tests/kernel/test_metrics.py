"""Rates and Prometheus metrics against real units: `bpfwall metrics` and the watcher's
--metrics-listen endpoint (scraped over HTTP, parsed with prometheus_client's parser) equal
`bpfwall stats --json` of the same moment; `stats --watch` counts exactly the packets sent and
stops cleanly on SIGINT and on a closed pipe."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.kernel.invoke import PYTHON, REPO, bpfwall, one_error_line
from tests.kernel.sockets import V4, bound, receive_all
from tests.kernel.watcher import inside, mkcg, unit, wait_for, write_policy

pytestmark = [pytest.mark.kernel, pytest.mark.traffic]


def samples(text: str) -> dict:
    """(metric sample name, sorted labels) → value"""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def ok(*args, prefix=()) -> str:
    r = bpfwall(*args, prefix=prefix)
    assert r.returncode == 0, r.stderr
    return r.stdout


def stats(name: str, *options, prefix=()) -> dict:
    return json.loads(ok(*options, "stats", name, "--json", prefix=prefix))


def assert_metrics_equal_stats(got: dict, s: dict, backend: str) -> None:
    """Every counter, the attachment count and the params of `s` (stats --json), as exposed."""
    unit_labels = (("backend", backend), ("unit", s["unit"]))
    for direction in ("ingress", "egress"):
        if s[direction] is None:
            continue
        for verdict, c in s["counters"][direction].items():
            labels = tuple(sorted(unit_labels + (("direction", direction), ("verdict", verdict))))
            assert got[("bpfwall_packets_total", labels)] == c["packets"], (direction, verdict)
            assert got[("bpfwall_bytes_total", labels)] == c["bytes"], (direction, verdict)
    assert got[("bpfwall_attached_cgroups", unit_labels)] == len({a["cgroup"] for a in s["attached"]})
    for name, value in s["params"].items():
        assert got[("bpfwall_param", tuple(sorted(unit_labels + (("name", name),))))] == value
    for direction, n in s.get("events", {}).get("lost", {}).items():
        assert got[("bpfwall_events_lost_total", tuple(sorted(unit_labels + (("direction", direction),))))] == n


def send(to_port: int, count: int, payload=b"x" * 12) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        for _ in range(count):
            tx.sendto(payload, ("127.0.0.1", to_port))


def test_metrics_equal_stats_for_a_bpf_unit_with_traffic(pin_root, temp_cgroup):
    allowed, denied = bound(temp_cgroup, *V4), bound(temp_cgroup, *V4)
    with allowed, denied:
        port = allowed.getsockname()[1]
        ok("load", "m.service", "--ingress", "udp && local_port == $port", "--param", f"port={port}",
           "--egress", "true")
        ok("attach", "m.service", temp_cgroup.path)
        send(port, 7)
        send(denied.getsockname()[1], 3)
        assert (receive_all(allowed), receive_all(denied)) == (7, 0)
        s = stats("m.service")
        got = samples(ok("metrics"))
    assert s["counters"]["ingress"]["pass"]["packets"] == 7 and s["counters"]["ingress"]["drop"]["packets"] == 3
    assert_metrics_equal_stats(got, s, "bpf")
    assert got[("bpfwall_param", (("backend", "bpf"), ("name", "port"), ("unit", "m.service")))] == port


def test_metrics_textfile_is_written_whole(pin_root, tmp_path):
    ok("load", "t.service", "--ingress", "udp")
    path = tmp_path / "bpfwall.prom"
    assert ok("metrics", "--textfile", str(path)) == ""
    assert_metrics_equal_stats(samples(path.read_text()), stats("t.service"), "bpf")
    assert os.listdir(tmp_path) == ["bpfwall.prom"]  # the temporary file was renamed over it
    one_error_line(bpfwall("metrics", "--textfile", str(tmp_path / "nodir" / "x.prom")), "no directory")
    one_error_line(bpfwall("metrics", "--textfile", str(tmp_path / "x.txt")), ".prom")


def test_metrics_equal_stats_for_an_nft_unit(pin_root, netns, table, temp_cgroup):
    ns = ("nsenter", f"--net=/run/netns/{netns}")
    ok("--backend", "nft", "--table", table, "load", "n.service", "--ingress", "tcp && local_port == $p",
       "--param", "p=8080", prefix=ns)
    ok("--backend", "nft", "--table", table, "attach", "n.service", temp_cgroup.path, prefix=ns)
    got = samples(ok("--table", table, "metrics", prefix=ns))
    s = stats("n.service", "--backend", "nft", "--table", table, prefix=ns)
    assert_metrics_equal_stats(got, s, "nft")
    assert got[("bpfwall_attached_cgroups", (("backend", "nft"), ("unit", "n.service")))] == 1


def test_metrics_skips_what_it_cannot_read_with_a_note(pin_root):
    """An unprivileged user cannot read the pin root: that backend is skipped (a note on
    stderr), the command still succeeds with what it could read."""
    ok("load", "s.service", "--ingress", "udp")
    os.chmod(pin_root, 0o700)
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", PYTHON, "-m", "bpfwall",
                        "--pin-root", pin_root, "metrics"], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "BPFWALL_NFT_STATE_DIR": "/nonexistent-bpfwall-test"})
    assert r.returncode == 0, r.stderr
    assert "bpfwall: note: bpf backend skipped: cannot read pin root" in r.stderr
    assert "s.service" not in r.stdout and "# TYPE bpfwall_packets_total counter" in r.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        return r.read().decode()


def test_watcher_metrics_endpoint_equals_stats(daemon, policy_dir, subtree, pin_root):
    rx_port, http_port = None, free_port()
    write_policy(policy_dir, unit("w.service", ingress="udp && local_port != 9", egress="true"))
    daemon.start(extra=("--metrics-listen", str(http_port)))  # a port alone: 127.0.0.1
    cg = mkcg(subtree, "w.service")  # made after the start: the watcher reacts to its IN_CREATE
    wait_for("the attach", lambda: stats("w.service")["attached"])
    with inside(cg):
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with rx:
        rx.bind(("127.0.0.1", 0))
        rx_port = rx.getsockname()[1]
        send(rx_port, 11)
        assert receive_all(rx) == 11
    s = stats("w.service")  # the traffic has stopped: the counters stay as they are
    got = samples(scrape(http_port))
    assert s["counters"]["ingress"]["pass"]["packets"] == 11
    assert_metrics_equal_stats(got, s, "bpf")
    assert got[("bpfwall_watch_reaction_seconds_count", ())] == 1  # one cgroup created, one reaction
    assert 0 < got[("bpfwall_watch_reaction_seconds_sum", ())] < 5
    assert "serving metrics on http://127.0.0.1:" in daemon.log()


@pytest.mark.parametrize("bad", ["localhost:9100", "1.2.3.4:0", "1.2.3.4:65536", "::1:9100", "[::1]", "x"])
def test_watch_refuses_a_bad_metrics_address(bad, policy_dir, subtree, pin_root, tmp_path):
    write_policy(policy_dir, unit("w.service", ingress="udp"))
    r = bpfwall("watch", "--metrics-listen", bad, "--cgroup-root", subtree, "--policy-dir", str(policy_dir),
                "--pin-root", pin_root, "--state-dir", str(tmp_path / "state"))
    one_error_line(r, "--metrics-listen")
    assert not os.path.exists(pin_root) or os.listdir(pin_root) == []


def watch_stats(name: str, *extra) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-m", "bpfwall", "stats", name, "--watch", *extra], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_stats_watch_counts_exactly_the_packets_sent_and_stops_on_sigint(pin_root, temp_cgroup):
    allowed, denied = bound(temp_cgroup, *V4), bound(temp_cgroup, *V4)
    with allowed, denied:
        port = allowed.getsockname()[1]
        ok("load", "r.service", "--ingress", f"udp && local_port == {port}")
        ok("attach", "r.service", temp_cgroup.path)
        proc = watch_stats("r.service", "0.5", "--json")
        try:
            baseline = json.loads(proc.stdout.readline())  # read before anything is sent
            assert baseline["counters"]["ingress"]["pass"]["packets"] == 0
            send(port, 40)
            send(denied.getsockname()[1], 15)
            passed = dropped = 0
            lines = []
            while passed < 40 or dropped < 15:
                line = json.loads(proc.stdout.readline())
                lines.append(line)
                assert len(lines) < 40, lines
                c = line["delta"]["ingress"]
                passed, dropped = passed + c["pass"]["packets"], dropped + c["drop"]["packets"]
                for verdict in ("pass", "drop"):  # the rate is the count over the interval measured
                    rate = line["rates"]["ingress"][verdict]["packets"]
                    assert abs(rate * line["seconds"] - c[verdict]["packets"]) < 1e-3
            assert (passed, dropped) == (40, 15)
            quiet = json.loads(proc.stdout.readline())
            assert quiet["delta"]["ingress"]["pass"]["packets"] == 0 and quiet["rates"]["ingress"]["pass"]["packets"] == 0
            assert "egress" not in quiet["delta"]  # the unit has no egress filter
            proc.send_signal(signal.SIGINT)
            assert proc.wait(10) == 0
            assert proc.stderr.read() == ""
        finally:
            proc.kill()
            proc.wait()


def test_stats_watch_text_and_closed_pipe(pin_root):
    ok("load", "p.service", "--ingress", "udp", "--egress", "tcp")
    proc = watch_stats("p.service", "0.1")
    try:
        assert proc.stdout.readline() == "p.service [enforce]: rates every 0.1 s (Ctrl-C stops)\n"
        first, second = proc.stdout.readline(), proc.stdout.readline()
        assert " ingress pass 0.0 pkt/s 0 B/s, drop 0.0 pkt/s 0 B/s\n" in first
        assert " egress  pass 0.0 pkt/s 0 B/s, drop 0.0 pkt/s 0 B/s\n" in second
        proc.stdout.close()  # nobody reads any more: the next line ends it, quietly
        assert proc.wait(10) == 0
        assert proc.stderr.read() == ""
    finally:
        proc.kill()
        proc.wait()


def test_stats_watch_of_a_unit_not_loaded_is_one_error(pin_root):
    one_error_line(bpfwall("stats", "nothing.service", "--watch"), "nothing.service")
    one_error_line(bpfwall("stats", "nothing.service", "--watch", "0"), "--watch")
