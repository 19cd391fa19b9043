"""The watcher's forwarding of drop events to the journal: fields, and the per-unit cap a second."""
from __future__ import annotations

from bpfwall.events import DropEvent
from bpfwall.watch import dropevents
from bpfwall.watch.dropevents import EventForwarder
from bpfwall.watch.log import Log


def event(unit: str, dport: int = 22) -> DropEvent:
    return DropEvent(1700000000.0, unit, "ingress", "drop", 4, 6, "203.0.113.9", "10.0.0.2", 51234, dport,
                     None, None, 60)


def test_records_carry_the_line_and_the_fields(monkeypatch):
    sent = []
    fwd = EventForwarder(Log(send=lambda message, **fields: sent.append((message, fields))), cap=5)
    fwd.forward(event("nginx.service"))
    (message, fields), = sent
    assert message == event("nginx.service").line()
    assert fields["OBJECT_SYSTEMD_UNIT"] == fields["UNIT"] == "nginx.service"
    assert (fields["BPFWALL_DIRECTION"], fields["BPFWALL_VERDICT"], fields["SRC"], fields["DST"], fields["PROTO"],
            fields["SPT"], fields["DPT"]) == ("ingress", "DROP", "203.0.113.9", "10.0.0.2", "tcp", "51234", "22")


def test_a_cap_per_unit_and_second_and_a_summary_of_the_rest(monkeypatch):
    now = [100.2]
    monkeypatch.setattr(dropevents.time, "monotonic", lambda: now[0])
    sent = []
    fwd = EventForwarder(Log(send=lambda message, **fields: sent.append((message, fields))), cap=3)
    for _ in range(10):
        fwd.forward(event("a.service"))
    fwd.forward(event("b.service"))
    assert [f["UNIT"] for _, f in sent] == ["a.service"] * 3 + ["b.service"]
    assert 0 < fwd.timeout_ms() <= 801
    now[0] = 101.0
    fwd.tick()
    message, fields = sent[-1]
    assert message == "a.service: 7 drop events not logged (more than 3 a second)"
    assert (fields["BPFWALL_NOT_LOGGED"], fields["OBJECT_SYSTEMD_UNIT"]) == ("7", "a.service")
    assert len(sent) == 5 and fwd.timeout_ms() is None
    fwd.forward(event("a.service"))  # a new second: forwarded again
    assert len(sent) == 6
