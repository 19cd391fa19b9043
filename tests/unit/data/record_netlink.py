"""Record the netlink messages tests/unit/test_nft_netlink.py parses: real answers of this
machine's kernel to bpfwall's nf_tables dumps, and the ruleset events the nft guard reads.

    sudo .venv/bin/python tests/unit/data/record_netlink.py

Root only: it moves itself into a network namespace of its own (so nothing it does touches the
host's ruleset), makes three cgroups, loads two units into a table there with bpfwall's nft
backend, then records into tests/unit/data/netlink/:

    dump-*.bin    the datagrams answering one dump request (dump.receive), as the kernel sent them
    events-*.bin  the datagrams a ruleset_events() socket received while one change was made
    expected.json what `nft -j list table` (not bpfwall's parser) and the cgroups say the
                  recordings hold: chains, rules per chain, map keys; per event file, what the
                  change removed

A .bin file is a sequence of datagrams, each a u32 length (little-endian) and its bytes.
Netlink headers are in host byte order: these recordings are of an x86-64 (little-endian) kernel.
"""
from __future__ import annotations

import ctypes
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "netlink"
sys.path.insert(0, str(HERE.parents[2]))

TABLE = "bpfwall-recorded"
OTHER = "other"
CLONE_NEWNET = 0x40000000
QUIET = 0.3  # seconds without an event: the change's events are all in
SO_RCVBUFFORCE = 33


def write_datagrams(path: Path, datagrams: list[bytes]) -> None:
    path.write_bytes(b"".join(struct.pack("<I", len(d)) + d for d in datagrams))


def nft(*argv: str) -> str:
    return subprocess.run(["nft", *argv], check=True, capture_output=True, text=True).stdout


def listed() -> dict:
    """Chains and rules per chain of our table, as nft's JSON listing shows them."""
    chains, rules = [], {}
    for item in json.loads(nft("-j", "list", "table", "inet", TABLE))["nftables"]:
        if "chain" in item:
            chains.append(item["chain"]["name"])
        elif "rule" in item:
            rules[item["rule"]["chain"]] = rules.get(item["rule"]["chain"], 0) + 1
    return {"chains": sorted(chains), "rules": rules}


def events_of(change) -> list[bytes]:
    """The ruleset events while `change()` runs, until none came for QUIET seconds."""
    from bpfwall.nft.guard import ruleset_events

    with ruleset_events() as s:
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)  # read after the change: room for all of it
        change()
        datagrams = []
        while select.select([s], [], [], QUIET)[0]:
            datagrams.append(s.recv(1 << 16))
    return datagrams


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("record_netlink.py needs root (a network namespace, cgroups, nftables)")
    if ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET) != 0:
        sys.exit(f"unshare(CLONE_NEWNET): {os.strerror(ctypes.get_errno())}")
    state = tempfile.mkdtemp(prefix="bpfwall-record-")
    os.environ["BPFWALL_NFT_STATE_DIR"] = state

    from bpfwall.backends import nft as backend
    from bpfwall.build import UnitProgram
    from bpfwall.lang.checker import analyze_pair
    from bpfwall.nft import dump
    from bpfwall.sandbox import TempCgroup

    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    expected: dict = {"table": TABLE}
    with TempCgroup("bpfwall-record") as a, TempCgroup("bpfwall-record") as b, TempCgroup("bpfwall-record") as c:
        backend.load(TABLE, "a.service", UnitProgram(*analyze_pair("udp && local_port in @p", "tcp")), sets={"p": [53]})
        # Enough chains that a chain dump spans several datagrams (unloaded before the events).
        many = " || ".join(f"(tcp && dst_port == {i} && src_port > 1)" for i in range(1, 50))
        backend.load(TABLE, "many.service", UnitProgram(*analyze_pair(None, many)))
        backend.attach(TABLE, "a.service", a.path)
        backend.attach(TABLE, "a.service", b.path)
        backend.attach(TABLE, "many.service", c.path)
        expected.update(listed())
        expected["maps"] = {"ingress_level_1": sorted(os.stat(p).st_ino for p in (a.path, b.path)),
                            "egress_level_1": sorted(os.stat(p).st_ino for p in (a.path, b.path, c.path))}

        dumps = {"chains": dump.chains_request(TABLE), "rules": dump.rules_request(TABLE),
                 "rules-a.service-in": dump.rules_request(TABLE, "a.service/in"),
                 "elements-ingress_level_1": dump.elements_request(TABLE, "ingress_level_1"),
                 "elements-egress_level_1": dump.elements_request(TABLE, "egress_level_1"),
                 "elements-missing": dump.elements_request(TABLE, "no_such_map")}
        for name, request in dumps.items():
            for _ in range(8):  # nothing changes the namespace's ruleset now: a dump is never interrupted
                datagrams = dump.receive(request, name)
                try:
                    dump.collect(datagrams, name)
                    break
                except dump.Interrupted:
                    continue
            write_datagrams(OUT / f"dump-{name}.bin", datagrams)

        backend.unload(TABLE, "many.service")
        rules_now = listed()["rules"]
        nft("add", "table", "inet", OTHER)
        nft("add", "chain", "inet", OTHER, "c")
        nft("add", "rule", "inet", OTHER, "c", "accept")
        with TempCgroup("bpfwall-record") as d:
            changes = [
                # (name, setup not recorded, the change, what the guard must make of it: whether
                # anything was removed, the chains whose rules to count (None: not checked))
                ("attach", None, lambda: backend.attach(TABLE, "a.service", d.path), False, []),
                ("detach", None, lambda: backend.detach(TABLE, "a.service", d.path), False, []),
                ("other-table-rules", None, lambda: nft("flush", "chain", "inet", OTHER, "c"), False, []),
                ("flush-table", None, lambda: nft("flush", "table", "inet", TABLE), True, sorted(rules_now)),
                # the table itself goes: whatever chains the events name, the check looks at them all
                ("flush-ruleset", lambda: backend.restore(TABLE), lambda: nft("flush", "ruleset"), True, None),
            ]
            expected["events"] = {}
            for name, setup, change, removes, chains in changes:
                if setup is not None:
                    setup()
                write_datagrams(OUT / f"events-{name}.bin", events_of(change))
                expected["events"][name] = {"any": removes, "chains": chains}
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    shutil.rmtree(state)
    print(f"recorded {len(list(OUT.glob('*.bin')))} files in {OUT}")


if __name__ == "__main__":
    main()
