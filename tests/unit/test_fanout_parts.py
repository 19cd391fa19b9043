"""The pure parts of drop-event sharing (no kernel, no sockets): fan-out message framing, the
record's direction, and nflog's sequence-gap count of lost messages."""
from __future__ import annotations

import socket
import struct

from bpfwall import fanout
from bpfwall import program_contract as pc
from bpfwall.backends.bpf_events import direction_of
from bpfwall.nft import nflog


def test_records_survive_the_framing_in_batches_of_bounded_size():
    records = [bytes([i % 256]) * (i % 700) for i in range(2000)]  # also empty ones
    messages = fanout.encode(records)
    assert len(messages) > 1 and all(len(m) <= fanout.BATCH_BYTES for m in messages)
    assert all(m[:1] == b"R" for m in messages)
    assert [r for m in messages for r in fanout.decode(m)] == records
    assert fanout.encode([]) == []


def test_a_dropped_record_is_counted_under_its_direction():
    for i, d in enumerate(pc.DIRECTIONS):
        raw = bytes(pc.Event(direction=i))
        assert direction_of(raw) == d


def _packet(seq: int | None, prefix: bytes = b"a.service egress") -> bytes:
    """One NFULNL_MSG_PACKET message as nfnetlink_log sends it."""
    attrs = b"".join(nflog._attr(k, v) for k, v in [
        (nflog.NFULA_PACKET_HDR, struct.pack("!HBB", 0x0800, 3, 0)),
        (nflog.NFULA_PREFIX, prefix + b"\0"),
        (nflog.NFULA_PAYLOAD, b"\x45" + b"\0" * 19),
        *([(nflog.NFULA_SEQ, struct.pack("!I", seq))] if seq is not None else []),
    ])
    body = nflog._GEN.pack(socket.AF_INET, 0, socket.htons(7)) + attrs
    return nflog._HDR.pack(nflog._HDR.size + len(body), nflog.NFNL_SUBSYS_ULOG << 8 | nflog.NFULNL_MSG_PACKET,
                           0, 0, 0) + body


def test_gaps_in_the_sequence_numbers_are_the_messages_lost():
    s = nflog.Sequence()
    got = [p for seq in (0, 1, 2, 6, 7, 10) for p in s.parse(_packet(seq))]
    assert [p.seq for p in got] == [0, 1, 2, 6, 7, 10]
    assert [p.prefix for p in got] == ["a.service egress"] * 6
    assert s.lost == 3 + 2


def test_a_group_bound_anew_numbers_from_zero_without_a_loss():
    s = nflog.Sequence()
    for seq in (40, 41, 0, 1, 3):
        s.parse(_packet(seq))
    assert s.lost == 1  # only 2 is missing: 0 after 41 is a new instance, not 2^32 - 42 losses


def test_messages_without_numbers_count_nothing():
    s = nflog.Sequence()
    assert len(s.parse(_packet(None) + _packet(None))) == 2 and s.lost == 0
