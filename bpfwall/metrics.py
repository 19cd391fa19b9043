"""Every unit's counters as Prometheus metrics: a prometheus_client Collector over the backends.

`bpfwall metrics` prints (or writes for node_exporter's textfile collector) what it collects;
`bpfwall watch --metrics-listen` serves it over HTTP from a thread of the watcher. Each scrape
reads the counters afresh through the Backend interface (bpf: from the pins, through fds of its
own; nft: the runner, which serialises its calls), so it shares no state with the watcher's loop.

A backend that cannot run here (nft without python3-nftables, no pin root readable) is
skipped with a note, not a failure: the other backend's units are still reported.
"""
from __future__ import annotations

import ipaddress

from .errors import Error, UsageError

MISSING = ("bpfwall metrics needs the prometheus_client Python module "
           "(Debian: apt-get install python3-prometheus-client; PyPI: prometheus-client, the `metrics` extra)")
# cgroup created → attached, as the watcher sees it: microseconds to seconds
REACTION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def prometheus():
    """The prometheus_client module, or one clear error naming the package that brings it."""
    try:
        import prometheus_client
    except ImportError:
        raise Error(MISSING) from None
    return prometheus_client


class UnitCollector:
    """A prometheus_client collector of every loaded unit of these backends (name → Backend)."""

    def __init__(self, backends: dict, note=lambda text: None):
        self.backends = backends
        self.note = note  # told why a backend or unit was skipped (one line)

    def describe(self):
        return []  # the families depend on what is loaded: collected on each scrape only

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        labels = ["backend", "unit"]
        packets = CounterMetricFamily("bpfwall_packets", "Packets a unit's filter passed or dropped "
                                      "(in audit mode: would have dropped)", labels=labels + ["direction", "verdict"])
        bytes_ = CounterMetricFamily("bpfwall_bytes", "Bytes a unit's filter passed or dropped",
                                     labels=labels + ["direction", "verdict"])
        lost = CounterMetricFamily("bpfwall_events_lost", "Drop events lost to the rate limit or a full buffer",
                                   labels=labels + ["direction"])
        attached = GaugeMetricFamily("bpfwall_attached_cgroups", "Cgroups a unit's filters are attached to",
                                     labels=labels)
        params = GaugeMetricFamily("bpfwall_param", "A unit's $param values", labels=labels + ["name"])
        audit = GaugeMetricFamily("bpfwall_audit_mode", "1 if a unit only counts what it would drop",
                                  labels=labels)
        for name, backend in self.backends.items():
            for s in self._stats(name, backend):
                unit = [name, s["unit"]]
                for direction, verdicts in s["counters"].items():
                    if s.get(direction) is None:
                        continue  # no filter in this direction: nothing it could count
                    for verdict, c in verdicts.items():
                        packets.add_metric(unit + [direction, verdict], c["packets"])
                        bytes_.add_metric(unit + [direction, verdict], c["bytes"])
                for direction, n in ((s.get("events") or {}).get("lost") or {}).items():
                    lost.add_metric(unit + [direction], n)
                attached.add_metric(unit, len({a["cgroup"] for a in s["attached"]}))
                for pname, value in s["params"].items():
                    params.add_metric(unit + [pname], value)
                audit.add_metric(unit, 1 if s["mode"] == "audit" else 0)
        yield from (packets, bytes_, lost, attached, params, audit)

    def _stats(self, name: str, backend) -> list[dict]:
        """stats() of each unit the backend has loaded; [] (noted) if the backend cannot run."""
        try:
            rows = backend.summary()
        except Error as e:
            self.note(f"{name} backend skipped: {e}")
            return []
        out = []
        for row in rows:
            try:
                out.append(backend.stats(row["unit"]))
            except Error as e:  # unloaded between the listing and now, or unreadable: the rest still count
                self.note(f"{name} backend: {row['unit']} skipped: {e}")
        return out


def registry(backends: dict, note=lambda text: None):
    """A CollectorRegistry holding a UnitCollector of `backends` (and nothing else)."""
    client = prometheus()
    reg = client.CollectorRegistry(auto_describe=False)
    reg.register(UnitCollector(backends, note))
    return reg


def reaction_histogram(reg):
    """The watcher's reaction time, cgroup created (its IN_CREATE read) → its filters attached."""
    return prometheus().Histogram("bpfwall_watch_reaction_seconds",
                                  "Seconds from a cgroup's creation event to its filters being attached",
                                  buckets=REACTION_BUCKETS, registry=reg)


def parse_listen(text: str) -> tuple[str, int]:
    """ADDR:PORT, [IPv6]:PORT or PORT (on 127.0.0.1) → (address, port); a UsageError otherwise.
    Only IP literals: a host name would be resolved by someone else's DNS at every start."""
    where = f"--metrics-listen {text!r}"
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    elif host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise UsageError(f"{where}: write an IPv6 address in brackets, e.g. [::1]:9100")
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise UsageError(f"{where}: the port must be a number from 1 to 65535")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(f"{where}: {host!r} is not an IP address (give ADDR:PORT, [ADDR6]:PORT or PORT)") from None
    if getattr(address, "scope_id", None):
        raise UsageError(f"{where}: scoped IPv6 addresses are not supported")
    return str(address), int(port)


def serve(reg, address: str, port: int) -> None:
    """Serve `reg` over HTTP (GET /metrics, or any path) from a daemon thread; an OSError (the
    port is taken) is raised here, before the caller goes on."""
    prometheus().start_http_server(port, address, reg)
