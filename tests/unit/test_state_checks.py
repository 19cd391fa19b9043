"""State files and netlink dumps, the parts that need no root: the nft state's checksum and
schema, the watcher state's checks, the private directory's file handling, and a dump the
kernel marked interrupted (NLM_F_DUMP_INTR)."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import struct

import pytest

from bpfwall.nft import dump
from bpfwall.nft.errors import NftError
from bpfwall.nft.names import UnitNames
from bpfwall.nft.records import NftState, Objects, UnitState
from bpfwall.nft.state import Invalid, StateFile, check_state, encode
from bpfwall.kernel.safefs import PrivateDir
from bpfwall.watch.state import Owned, State, WatchError

TABLE = "bpfwall-test-state"


def unit_record() -> dict:
    names = UnitNames("a.service")
    chains = [names.chain("ingress", 0), names.chain("ingress", 1)]
    return {"ingress": "udp && local_port in @p", "egress": None, "params": {"x": 3}, "mode": "enforce",
            "sets": {"p": {"kind": "number", "elements": ["53", "8000..8100"]}},
            "objects": {"chains": chains, "sets": [names.set("p", "port")],
                        "counters": [names.counter("ingress", v) for v in ("pass", "drop", "lost")],
                        "rules": {chains[0]: 2, chains[1]: 1}},
            "attached": [{"cgroup": "system.slice/a.service", "level": 2, "id": 1234, "directions": ["ingress"]}],
            "log_rate": 10, "log_burst": 50, "strict": False, "known": []}


def good_state() -> dict:
    return {"version": 4, "table": TABLE, "log_group": 2120, "units": {"a.service": unit_record()}}


def test_a_state_bpfwall_writes_passes():
    check_state(good_state(), TABLE)


def test_a_version_2_state_reads_as_one_without_events(tmp_path):
    """Version 2 (before drop events) rendered no log rules and no lost counters: it reads as
    log_rate 0, which renders the same, and is written back as version 4."""
    state = good_state()
    del state["log_group"]
    u = state["units"]["a.service"]
    del u["log_rate"], u["log_burst"], u["strict"], u["known"]
    u["objects"]["counters"] = u["objects"]["counters"][:2]
    state["version"] = 2
    sf = StateFile(TABLE, str(tmp_path / "nft"))
    read = sf.decode(encode(state))
    assert (read.units["a.service"].log_rate, read.log_group) == (0, 2120)
    assert read.as_json()["version"] == 4
    check_state(read.as_json(), TABLE)


def test_a_version_3_state_reads_as_not_strict(tmp_path):
    state = good_state()
    state["version"] = 3
    del state["units"]["a.service"]["strict"], state["units"]["a.service"]["known"]
    read = StateFile(TABLE, str(tmp_path / "nft")).decode(encode(state))
    assert (read.units["a.service"].strict, read.units["a.service"].known) == (False, [])
    state["units"]["a.service"]["strict"] = True  # not a field of version 3
    with pytest.raises(Invalid, match="unknown field strict"):
        check_state(state, TABLE)


@pytest.mark.parametrize("ingress,egress", [
    ("dst_port in @ports || icmp_type in @ports || saddr in @nets || len in @ports", None),
    (None, "(tcp && remote_port in @ports) || (icmp && icmp_code in @ports) || daddr in @nets"),
    ("udp && local_port == $p", "!(icmp_type in @ports) || " + " || ".join(f"dst_port == {i}" for i in range(40))),
])
def test_every_rendering_passes_the_check(ingress, egress):
    """What load() records for real expressions (every set key type, many chains) is valid."""
    from bpfwall.backends import nft
    from bpfwall.nft import layout

    u = {"ingress": ingress, "egress": egress, "params": {"p": 7} if "$p" in (ingress or "") else {},
         "mode": "audit", "sets": {"ports": {"kind": "number", "elements": ["0", "53", "8000..8100"]},
                                   "nets": {"kind": "address", "elements": ["10.0.0.0/8", "fd00::/8"]}},
         "attached": [{"cgroup": "a.slice/b.service", "level": 2, "id": 77, "directions": ["egress", "ingress"]}]}
    u["sets"] = {n: s for n, s in u["sets"].items() if f"@{n}" in (ingress or "") + (egress or "")}
    u["attached"][0]["directions"] = [d for d in ("ingress", "egress") if u[d] is not None]
    u["objects"] = Objects().as_json()  # nothing rendered yet: what from_json reads before the rendering
    for rate, strict in ((0, False), (25, False), (0, True)):
        u.update(log_rate=rate, log_burst=7, strict=strict, known=[{"cgroup": "a.slice", "id": 76}] if strict else [])
        u["objects"] = layout.objects_of(nft._render("b.service", UnitState.from_json(u), 9)).as_json()
        check_state({"version": 4, "table": TABLE, "log_group": 9, "units": {"b.service": u}}, TABLE)


def _set(path: str, value):
    def change(state):
        *head, last = path.split("/")
        target = state
        for key in head:
            target = target[int(key)] if isinstance(target, list) else target[key]
        if value is KeyError:
            del target[last]
        elif isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value
    return change


U = "units/a.service"
BAD = {  # what a hand edit or damage may do → the field the error must name
    "units a list": (_set("units", []), "units: expected an object"),
    "unit a string": (_set(U, "x"), "units.a.service: expected an object"),
    "unit name": (lambda s: s["units"].update({"a/b": s["units"]["a.service"]}), "'a/b' is not a unit name"),
    "version": (_set("version", "2"), "version:"),
    "log_group too big": (_set("log_group", 65536), "log_group:"),
    "log_group missing": (_set("log_group", KeyError), "missing log_group"),
    "log_rate negative": (_set(f"{U}/log_rate", -1), "units.a.service.log_rate"),
    "log_burst zero": (_set(f"{U}/log_burst", 0), "units.a.service.log_burst"),
    "log_rate a string": (_set(f"{U}/log_rate", "10"), "units.a.service.log_rate"),
    "no lost counter while logging": (lambda s: s["units"]["a.service"]["objects"]["counters"].pop(),
                                      "objects.counters"),
    "lost counter while not logging": (_set(f"{U}/log_rate", 0), "objects.counters"),
    "other table": (_set("table", "other"), "table: expected"),
    "expression a number": (_set(f"{U}/ingress", 5), "units.a.service.ingress"),
    "mode": (_set(f"{U}/mode", "allow-all"), "units.a.service.mode"),
    "param a string": (_set(f"{U}/params/x", "3"), "units.a.service.params.x"),
    "param a bool": (_set(f"{U}/params/x", True), "units.a.service.params.x"),
    "param too big": (_set(f"{U}/params/x", 2**64), "units.a.service.params.x"),
    "set kind": (_set(f"{U}/sets/p/kind", "string"), "units.a.service.sets.p.kind"),
    "set element with a comma": (_set(f"{U}/sets/p/elements", ["1,2"]), "units.a.service.sets.p.elements"),
    "unknown field": (_set(f"{U}/rules", []), "unknown field rules"),
    "missing field": (_set(f"{U}/attached", KeyError), "missing attached"),
    # A level reaches nft syntax (the dispatch rule): only an integer, the cgroup's depth.
    "level injects nft syntax": (_set(f"{U}/attached/0/level", "2\nflush ruleset"), "attached[0].level"),
    "level not the depth": (_set(f"{U}/attached/0/level", 1), "attached[0].level"),
    "id a string": (_set(f"{U}/attached/0/id", "1234"), "attached[0].id"),
    "cgroup escapes": (_set(f"{U}/attached/0/cgroup", "../../etc"), "attached[0].cgroup"),
    "cgroup absolute": (_set(f"{U}/attached/0/cgroup", "/system.slice"), "attached[0].cgroup"),
    "direction not the unit's": (_set(f"{U}/attached/0/directions", ["egress"]), "attached[0].directions"),
    # Object names are flushed and deleted by name: another unit's chain must not be one.
    "another unit's chain": (_set(f"{U}/objects/chains/1", UnitNames("b.service").chain("ingress", 0)),
                             "objects.chains"),
    "a base chain": (_set(f"{U}/objects/chains/1", "input_level_1"), "objects.chains"),
    "strict a string": (_set(f"{U}/strict", "yes"), "units.a.service.strict"),
    "known while not strict": (_set(f"{U}/known", [{"cgroup": "a.slice", "id": 5}]), "units.a.service.known"),
    "known cgroup escapes": (lambda s: s["units"]["a.service"].update(
        strict=True, known=[{"cgroup": "../x", "id": 5}]), "known[0].cgroup"),
    "known id zero": (lambda s: s["units"]["a.service"].update(
        strict=True, known=[{"cgroup": "a.slice", "id": 0}]), "known[0].id"),
    "rule count": (lambda s: s["units"]["a.service"]["objects"]["rules"].update(
        {s["units"]["a.service"]["objects"]["chains"][0]: 0}), "objects.rules"),
}


@pytest.mark.parametrize("change,names", BAD.values(), ids=BAD.keys())
def test_a_malformed_state_is_refused_naming_the_field(tmp_path, change, names):
    state = good_state()
    change(state)
    sf = StateFile(TABLE, str(tmp_path / "nft"))
    with pytest.raises(NftError) as e:
        sf.decode(encode(state))  # a checksum that matches: the schema must catch it
    message = str(e.value)
    assert names in message and "\n" not in message and sf.path in message


def test_a_hand_edit_is_refused_by_the_checksum(tmp_path):
    sf = StateFile(TABLE, str(tmp_path / "nft"))
    data = encode(good_state())
    assert sf.decode(data).as_json() == good_state()
    edited = data.replace(b'"udp && local_port in @p"', b'"true"')
    with pytest.raises(NftError, match="changed outside bpfwall or is damaged: its checksum does not match"):
        sf.decode(edited)
    with pytest.raises(NftError, match="no checksum line"):
        sf.decode(data.partition(b"\n")[2])  # the body alone (as an older bpfwall wrote it)


def test_deep_nesting_is_one_line(tmp_path):
    sf = StateFile(TABLE, str(tmp_path / "nft"))
    body = b"[" * 100000 + b"]" * 100000
    data = json.dumps({"bpfwall": "nft-state", "sha256": hashlib.sha256(body).hexdigest()}).encode() + b"\n" + body
    with pytest.raises(NftError, match="not valid JSON"):
        sf.decode(data)


def test_save_and_load_round_trip_in_a_private_directory(tmp_path):
    sf = StateFile(TABLE, str(tmp_path / "nft"))
    with sf.locked():
        sf.save(NftState.from_json(good_state()))
    assert StateFile(TABLE, str(tmp_path / "nft")).load().as_json() == good_state()
    assert os.stat(tmp_path / "nft").st_mode & 0o777 == 0o700
    assert os.stat(sf.path).st_mode & 0o777 == 0o600
    assert sorted(os.listdir(tmp_path / "nft")) == [f"{TABLE}.json", f"{TABLE}.lock"]  # no temporary file


def test_a_symlinked_state_file_is_not_followed(tmp_path):
    sf = StateFile(TABLE, str(tmp_path / "nft"))
    with sf.locked():
        pass
    victim = tmp_path / "victim.json"
    victim.write_bytes(encode(good_state()))
    os.symlink(victim, sf.path)
    with pytest.raises(NftError, match=f"^{sf.path}: refused: the state file is a symbolic link \\(to {victim}\\)"):
        sf.load()
    with sf.locked():
        sf.save(NftState(TABLE))  # the last unit gone: the file is removed, not its target
    assert victim.exists() and not os.path.lexists(sf.path)


def test_temporary_names_are_unpredictable_and_removed_on_failure(tmp_path, monkeypatch):
    d = PrivateDir(str(tmp_path / "s"), "the test directory", WatchError)
    try:
        temps = {d.stage("x.json", b"1") for _ in range(3)}
        assert len(temps) == 3 and all(re.fullmatch(r"\.x\.json\.[0-9a-f]{16}\.tmp", t) for t in temps)
        for t in temps:
            d.discard(t)
        real_write = os.write

        def full(fd, data):
            real_write(fd, bytes(data[:1]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(os, "write", full)
        with pytest.raises(WatchError, match="x.json: cannot write the state file: No space left on device"):
            d.replace("x.json", b"{}")
        monkeypatch.undo()
        assert os.listdir(tmp_path / "s") == []
    finally:
        d.close()


def test_killed_writers_temporary_files_are_removed_under_the_lock(tmp_path):
    sf = StateFile(TABLE, str(tmp_path / "nft"))
    with sf.locked():
        pass
    left = tmp_path / "nft" / f".{TABLE}.json.0123456789abcdef.tmp"
    left.write_text("half")
    with sf.locked():
        assert not left.exists()


# -- the watcher's state --------------------------------------------------------------------------

WATCH_BAD = {
    "not json": b"{not json",
    "units a list": b'{"pin_root": "/sys/fs/bpf/x", "units": []}',
    "record a string": b'{"pin_root": "/sys/fs/bpf/x", "units": {"a.service": "x"}}',
    "fingerprint a number": b'{"pin_root": "/sys/fs/bpf/x", "units": {"a.service": '
                            b'{"fingerprint": 5, "backend": "bpf", "programs": {}}}}',
    "program id a string": b'{"pin_root": "/sys/fs/bpf/x", "units": {"a.service": '
                           b'{"fingerprint": "ab", "backend": "bpf", "programs": {"ingress": "7"}}}}',
    "backend": b'{"pin_root": "/sys/fs/bpf/x", "units": {"a.service": '
               b'{"fingerprint": "ab", "backend": "iptables", "programs": {}}}}',
    "table": b'{"pin_root": "/sys/fs/bpf/x", "retired": {"a.service": '
             b'{"fingerprint": "ab", "backend": "nft", "programs": {}, "table": "x y"}}}',
    "unit name": b'{"pin_root": "/sys/fs/bpf/x", "units": {"a/b": '
                 b'{"fingerprint": "ab", "backend": "bpf", "programs": {}}}}',
    "deep": b"[" * 100000 + b"]" * 100000,
}


@pytest.mark.parametrize("data", WATCH_BAD.values(), ids=WATCH_BAD.keys())
def test_a_malformed_watcher_state_reads_as_none_with_a_warning(tmp_path, data):
    state = State(str(tmp_path / "w"), "/sys/fs/bpf/x")
    state.write()
    with open(state.path, "wb") as f:
        f.write(data)
    warning = state.read()
    assert state.units == {} and state.retired == {}
    assert warning.startswith(f"the watcher state {state.path} is unusable (") and "\n" not in warning


def test_watcher_state_round_trip(tmp_path):
    state = State(str(tmp_path / "w"), "/sys/fs/bpf/x")
    state.units = {"a.service": Owned("ab12", "bpf", {"ingress": 5})}
    state.retired = {"b.service": Owned("cd", "nft", {}, "bpfwall")}
    state.write()
    again = State(str(tmp_path / "w"), "/sys/fs/bpf/x")
    assert again.read() is None and again.units == state.units and again.retired == state.retired


# -- an interrupted dump ---------------------------------------------------------------------------

def _message(kind: int, flags: int, payload: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(payload), kind, flags, 1, 0) + payload + bytes(-len(payload) % 4)


def _chain(name: str) -> bytes:
    data = name.encode() + b"\0"
    attr = struct.pack("=HH", 4 + len(data), dump.NFTA_CHAIN_NAME) + data + bytes(-len(data) % 4)
    return struct.pack("=BBH", 1, 0, 0) + attr


NEWCHAIN = (dump.NFNL_SUBSYS_NFTABLES << 8) | 3
DONE = _message(dump.NLMSG_DONE, 0x2, b"\0\0\0\0")


def test_collect_reads_a_dump_across_datagrams():
    got = dump.collect([_message(NEWCHAIN, 0x2, _chain("a")), _message(NEWCHAIN, 0x2, _chain("b")) + DONE], "x")
    assert [dump.string(a[dump.NFTA_CHAIN_NAME]) for a in got] == ["a", "b"]


def test_a_dump_marked_interrupted_is_not_taken():
    datagrams = [_message(NEWCHAIN, 0x2, _chain("a")), _message(NEWCHAIN, 0x2 | dump.NLM_F_DUMP_INTR, _chain("b"))
                 + _message(dump.NLMSG_DONE, 0x2 | dump.NLM_F_DUMP_INTR, b"\0\0\0\0")]
    with pytest.raises(dump.Interrupted):
        dump.collect(datagrams, "x")


def test_a_dump_error_and_a_malformed_answer_are_one_line():
    error = _message(dump.NLMSG_ERROR, 0, struct.pack("=i", -errno.EPERM) + bytes(16))
    with pytest.raises(NftError, match="^listing: Operation not permitted$"):
        dump.collect([error], "listing")
    assert dump.collect([_message(dump.NLMSG_ERROR, 0, struct.pack("=i", -errno.ENOENT) + bytes(16))], "x") is None
    with pytest.raises(NftError, match="unreadable netlink answer while listing"):
        dump.collect([struct.pack("=IHHII", 400, 3, 0, 0, 0)], "listing")
