"""The ring buffer reader against a real BPF ring buffer filled by a real program (BPF_PROG_TEST_RUN)."""
from __future__ import annotations

import struct

import pytest

from bpfwall.kernel import elf, loader, progs
from bpfwall.kernel.ringbuf import RingBuffer
from tests.kernel.kernel_objects import compile_test_objects

pytestmark = [pytest.mark.kernel]

ETH = b"\0" * 12 + b"\x08\x00"


def udp4(payload: int) -> bytes:
    total = 28 + payload
    return (struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, 17, 0, bytes([127, 0, 0, 1]), bytes([127, 0, 0, 1]))
            + struct.pack("!HHHH", 1000, 2000, 8 + payload, 0) + b"x" * payload)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path = compile_test_objects(tmp_path_factory.mktemp("ringbuf"))["kernel_test_ringbuf"]
    obj = elf.read_object(path)
    with loader.load(obj) as lo:
        yield lo


def run(loaded, packet: bytes) -> None:
    retval, _ = progs.prog_test_run(loaded.progs["cgroup_skb/egress"], ETH + packet)
    assert retval == 1


def test_records_arrive_in_order_and_complete(loaded):
    with RingBuffer(loaded.maps["kt_events"]) as rb:
        rb.drain()
        for size in range(50):
            run(loaded, udp4(size))
        got = [struct.unpack("=II", r) for r in rb.poll(timeout=1.0)]
    assert [length for length, _ in got] == [28 + size for size in range(50)]
    seqs = [s for _, s in got]
    assert seqs == list(range(seqs[0], seqs[0] + 50))


def test_the_reader_frees_space_and_survives_wrapping(loaded):
    """16 KiB of ring, 16 bytes a record: 5,000 records only fit if every drain gives the space
    back, and they wrap around the end many times."""
    with RingBuffer(loaded.maps["kt_events"]) as rb:
        rb.drain()
        got = []
        for i in range(5000):
            run(loaded, udp4(i % 7))
            if i % 500 == 499:
                got += rb.drain()
        got += rb.drain()
    seqs = [struct.unpack("=II", r)[1] for r in got]
    assert len(seqs) == 5000 and seqs == list(range(seqs[0], seqs[0] + 5000))


def test_poll_times_out_when_nothing_comes(loaded):
    with RingBuffer(loaded.maps["kt_events"]) as rb:
        rb.drain()
        assert rb.poll(timeout=0.05) == []
