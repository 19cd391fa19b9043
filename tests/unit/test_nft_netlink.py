"""The nft guard's netlink parsing without root: bpfwall/nft/dump.py on recorded answers of a real
kernel to its dumps, and the guard's Removals on recorded ruleset events (both recorded by
tests/unit/data/record_netlink.py, compared with what `nft -j list` said at the time)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from bpfwall.nft import dump
from bpfwall.nft.errors import NftError
from bpfwall.nft.guard import Removals

DATA = Path(__file__).parent / "data" / "netlink"
EXPECTED = json.loads((DATA / "expected.json").read_text())
TABLE = EXPECTED["table"]


def datagrams(name: str) -> list[bytes]:
    """A recording: u32 little-endian length, datagram, and so on."""
    raw, out, off = (DATA / f"{name}.bin").read_bytes(), [], 0
    while off < len(raw):
        (length,) = struct.unpack_from("<I", raw, off)
        out.append(raw[off + 4:off + 4 + length])
        off += 4 + length
    assert off == len(raw)
    return out


def answers(name: str):
    return dump.collect(datagrams(name), name)


# -- dumps ------------------------------------------------------------------------------------

def test_chain_dump_across_datagrams():
    assert len(datagrams("dump-chains")) >= 3  # the dump spans datagrams, NLMSG_DONE in the last
    assert dump.chains_in(answers("dump-chains"), TABLE) == set(EXPECTED["chains"])
    assert dump.chains_in(answers("dump-chains"), "another-table") == set()


def test_rule_dump_counts_rules_per_chain():
    assert len(datagrams("dump-rules")) >= 3
    assert dump.rules_per_chain(answers("dump-rules")) == EXPECTED["rules"]
    assert dump.rules_per_chain(answers("dump-rules-a.service-in")) == {"a.service/in": EXPECTED["rules"]["a.service/in"]}


@pytest.mark.parametrize("map_name", ["ingress_level_1", "egress_level_1"])
def test_element_dump_gives_cgroup_ids(map_name):
    assert dump.cgroup_ids(answers(f"dump-elements-{map_name}")) == set(EXPECTED["maps"][map_name])


def test_a_missing_map_is_enoent_not_empty():
    assert answers("dump-elements-missing") is None


def _set_flag(datagram: bytes, flag: int) -> bytes:
    """The datagram with `flag` set in its first message's nlmsg_flags."""
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", datagram)
    return struct.pack("=IHHII", length, kind, flags | flag, seq, pid) + datagram[16:]


def test_an_interrupted_dump_is_not_taken():
    got = datagrams("dump-chains")
    got[1] = _set_flag(got[1], dump.NLM_F_DUMP_INTR)  # the ruleset changed between two parts
    with pytest.raises(dump.Interrupted):
        dump.collect(got, "listing")


def test_a_dump_cut_short_or_garbled_is_one_error():
    got = datagrams("dump-rules")
    with pytest.raises(NftError, match="^the netlink answer ended early while listing$"):
        dump.collect(got[:-1], "listing")  # no NLMSG_DONE
    first = got[0]
    sizes = [end - start + 16 for _, _, start, end in dump.messages_flags(first)]
    whole = sum((n + 3) & ~3 for n in sizes[:5])
    for cut in (whole + 100, whole + 8):  # in a message; in the header of the next one (a message lost)
        with pytest.raises(NftError, match="^unreadable netlink answer while listing$"):
            dump.collect([first[:cut]] + got[1:], "listing")


# -- ruleset events -----------------------------------------------------------------------------

@pytest.mark.parametrize("change", sorted(EXPECTED["events"]))
def test_removals_seen_in_recorded_events(change):
    """What the guard makes of a change's events: an attach, a detach or another table's rules
    removed ask for no check; `flush table` names every chain of ours that lost its rules."""
    expected = EXPECTED["events"][change]
    r = Removals(TABLE)
    recorded = datagrams(f"events-{change}")
    assert recorded
    for buf in recorded:
        r.read(buf)
    assert r.any == expected["any"] and not r.everything
    if expected["chains"] is not None:
        assert r.depth() == (set(expected["chains"]) or False)


def test_events_cut_short_trust_nothing():
    r = Removals(TABLE)
    r.read(datagrams("events-attach")[0][:-3])
    assert r.any and r.depth() is True


def removes_something(buf: bytes, table: str) -> bool:
    """Whether the guard reads anything but additions and element changes (of `table`'s rules)."""
    r = Removals(table)
    r.read(buf)
    return r.any


def test_guard_ignores_element_changes_and_sees_removals():
    """Every message type, built by hand (nfnetlink messages, type = 10 << 8 | msg)."""
    def attr(kind, text):
        data = text.encode() + b"\0"
        return (4 + len(data)).to_bytes(2, "little") + kind.to_bytes(2, "little") + data + bytes(-len(data) % 4)

    def msg(kind, payload=b""):
        return (20 + len(payload)).to_bytes(4, "little") + ((10 << 8) | kind).to_bytes(2, "little") + bytes(14) \
            + payload

    def delrule(table, chain):
        return msg(8, attr(1, table) + attr(2, chain))

    assert not removes_something(msg(12) + msg(15), "t")   # NEWSETELEM, NEWGEN: an attach
    assert not removes_something(msg(14) + msg(15), "t")   # DELSETELEM: a detach
    for kind in (2, 5, 11, 20):                            # DELTABLE, DELCHAIN, DELSET, DELOBJ
        assert removes_something(msg(12) + msg(kind), "t")
    assert removes_something(delrule("t", "a.service/in"), "t")
    assert not removes_something(delrule("other", "a.service/in"), "t")  # another table's rules
    r = Removals("t")
    r.read(delrule("t", "a.service/in") + delrule("t", "output_level_2") + delrule("u", "x") + msg(15))
    assert r.depth() == {"a.service/in", "output_level_2"}
    r.clear()
    r.read(msg(12) + msg(15))
    assert r.depth() is False and not r.any
    r.read(msg(8, attr(1, "t"))[:-3])  # cut short: trust nothing
    assert r.depth() is True
