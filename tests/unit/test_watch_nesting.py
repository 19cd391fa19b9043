"""watch/nesting.py: which unit entries the watcher builds as guards, and that the mark survives a
restart (read from what is loaded). Pure: no kernel (tests/kernel/test_slice_guard.py and
the differential tests run it for real)."""
from __future__ import annotations

from dataclasses import dataclass

from bpfwall.policy import Entry, Policy
from bpfwall.watch.nesting import entries_to_nest, nesting_from_pins, with_nesting
from bpfwall.watch.state import Owned


def entry(name: str, egress: str = "true", line: int = 1) -> Entry:
    return Entry(name=name, ingress=None, egress=egress, params={}, sets={}, mode="enforce", backend="bpf",
                 set_capacity=16, cgroup=None, file="p.toml", line=line)


@dataclass
class Handle:
    """What entries_to_nest reads of a backend's handle (backends/base.py Handle)."""
    runs_below: bool = True
    guards: bool = False


POLICY = Policy([entry("user@1000.service"), entry("app.slice", line=2), entry("app-x.scope", line=3)])


def test_only_unit_entries_named_are_built_as_guards():
    nested = with_nesting(POLICY, {"user@1000.service", "app.slice", "nonesuch.service"})
    flags = {e.name: e.guards_nested for e in nested.entries}
    assert flags == {"user@1000.service": True, "app.slice": False, "app-x.scope": False}
    assert nested.entry("user@1000.service").program().slice_default  # built as a guard
    assert nested.entry("user@1000.service").fingerprint() != POLICY.entry("user@1000.service").fingerprint()
    assert with_nesting(POLICY, set()) is POLICY and with_nesting(POLICY, {"app.slice"}) is POLICY


def test_the_mark_is_read_back_from_what_is_loaded():
    guards = {"user@1000.service", "app.slice"}  # what the pins say is a guard
    assert nesting_from_pins(POLICY, {}, lambda e: e.name in guards) == {"user@1000.service"}  # slices are anyway
    assert nesting_from_pins(POLICY, {}, lambda e: False) == set()
    nested = {e.name: Owned(e.fingerprint(), "bpf") for e in with_nesting(POLICY, {"user@1000.service"}).entries}
    changed = Policy([entry("user@1000.service", egress="false"), *POLICY.entries[1:]])
    assert nesting_from_pins(changed, nested, lambda e: e.name in guards) == {"user@1000.service"}  # a new filter
    assert nesting_from_pins(POLICY, nested, lambda e: e.name in guards) == {"user@1000.service"}


def test_an_entry_recorded_plain_is_not_asked():
    asked = []
    plain = {e.name: Owned(e.fingerprint(), "bpf") for e in POLICY.entries}
    assert nesting_from_pins(POLICY, plain, lambda e: asked.append(e.name)) == set()
    assert asked == []


ROOT = "/sys/fs/cgroup/t"
MGR = f"{ROOT}/user.slice/user@1000.service"


def test_an_entry_attached_below_a_plain_unit_entry_nests_it():
    units = {"user@1000.service": Handle(), "app.slice": Handle(guards=True), "user.slice": Handle(guards=True),
             "app-x.scope": Handle()}
    attached = {f"{ROOT}/user.slice": "user.slice", MGR: "user@1000.service", f"{MGR}/app.slice": "app.slice"}
    assert entries_to_nest(f"{MGR}/app.slice", "app.slice", ROOT, attached, units) == {"user@1000.service"}
    assert entries_to_nest(f"{MGR}/app.slice/app-x.scope", "app-x.scope", ROOT, attached, units) \
        == {"user@1000.service"}  # slice defaults above are guards already
    assert entries_to_nest(MGR, "user@1000.service", ROOT, attached, units) == set()


def test_nothing_to_nest_for_the_same_entry_a_guard_or_filters_that_do_not_run_below():
    attached = {MGR: "*.service"}
    assert entries_to_nest(f"{MGR}/a.service", "*.service", ROOT, attached, {"*.service": Handle()}) == set()
    attached = {MGR: "user@1000.service"}
    for handle in (Handle(guards=True), Handle(runs_below=False)):
        assert entries_to_nest(f"{MGR}/app.slice", "app.slice", ROOT, attached,
                               {"user@1000.service": handle}) == set()
    # the root the watcher watches is not above anything of its own
    assert entries_to_nest(f"{ROOT}/a.slice", "a.slice", ROOT, {ROOT: "x"}, {"x": Handle()}) == set()
