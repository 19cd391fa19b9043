"""The pure parts of rates and metrics: --metrics-listen addresses, counter deltas and rates."""
from __future__ import annotations

import sys

import pytest

from bpfwall import metrics
from bpfwall.errors import Error, UsageError
from bpfwall.rates import deltas, human_bytes, per_second


@pytest.mark.parametrize("text,expected", [
    ("9100", ("127.0.0.1", 9100)),
    ("0.0.0.0:9100", ("0.0.0.0", 9100)),
    ("10.0.0.2:1", ("10.0.0.2", 1)),
    ("[::1]:65535", ("::1", 65535)),
    ("[::]:9100", ("::", 9100)),
])
def test_listen_addresses(text, expected):
    assert metrics.parse_listen(text) == expected


@pytest.mark.parametrize("text,words", [
    ("localhost:9100", "not an IP address"), ("", "port"), ("0", "port"), ("65536", "port"),
    ("1.2.3.4:", "port"), ("1.2.3.4:x", "port"), ("1.2.3.4:٣", "port"), ("::1:9100", "brackets"),
    ("[fe80::1%eth0]:9100", "scoped"), ("1.2.3.4:9100\nX", "port"), ("300.1.1.1:80", "not an IP address"),
])
def test_bad_listen_addresses_are_usage_errors(text, words):
    with pytest.raises(UsageError, match=words) as e:
        metrics.parse_listen(text)
    assert len(e.value.lines()) == 1


def counters(ip, ib, dp, db):
    return {"ingress": {"pass": {"packets": ip, "bytes": ib}, "drop": {"packets": dp, "bytes": db}}}


def test_deltas_and_rates():
    d = deltas(counters(10, 1000, 2, 100), counters(30, 3000, 2, 100))
    assert d == counters(20, 2000, 0, 0)
    assert per_second(d, 2.0) == {"ingress": {"pass": {"packets": 10.0, "bytes": 1000.0},
                                              "drop": {"packets": 0.0, "bytes": 0.0}}}
    assert per_second(d, 0)["ingress"]["pass"]["packets"] == 0.0


def test_a_counter_that_went_down_was_reset():
    """Unloaded and loaded again between two reads: what it counts now is all new."""
    assert deltas(counters(500, 9000, 5, 50), counters(3, 120, 7, 70)) == counters(3, 120, 2, 20)


def test_a_direction_new_since_the_last_read_counts_from_zero():
    assert deltas({}, counters(4, 40, 0, 0)) == counters(4, 40, 0, 0)


def test_human_bytes():
    assert [human_bytes(r) for r in (0, 999, 8400, 2.5e6, 7e12)] == ["0 B/s", "999 B/s", "8.4 kB/s", "2.5 MB/s",
                                                                      "7000.0 GB/s"]


def test_missing_prometheus_client_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(Error) as e:
        metrics.prometheus()
    assert "python3-prometheus-client" in str(e.value) and "prometheus-client" in str(e.value)
