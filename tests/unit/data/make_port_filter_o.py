"""Build port_filter.o, the checked-in object the ELF and BTF reader tests read (no clang needed
to run them): one representative unit, through bpfwall's own build path (build.build: the
generated header, bpfwall's clang flags, the object cache), from this repository's
bpf/port_filter.c.

    .venv/bin/python tests/unit/data/make_port_filter_o.py

Rebuild it when port_filter.c or the generated C changes what tests/unit/test_elf_btf.py checks.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from bpfwall import build  # noqa: E402
from bpfwall.lang.checker import analyze_pair  # noqa: E402

# Every kind of map the programs use: counters, mode, meta, params, a number set, an address set.
INGRESS = "icmp || tcp && local_port in @web || udp && dst_port == $dns || saddr in @admins"
EGRESS = "tcp && remote_port in {80, 443} || daddr in 10.0.0.0/8"
SET_CAPACITY = 100


def main() -> None:
    program = build.UnitProgram(*analyze_pair(INGRESS, EGRESS), set_capacity=SET_CAPACITY)
    # A cache directory of our own (the object cache trusts no directory others may write, like /tmp)
    cache = Path(tempfile.mkdtemp(prefix=".build-", dir=HERE))
    try:
        build.build(program, cache)
        (obj,) = cache.glob("*.o")
        shutil.copyfile(obj, HERE / "port_filter.o")
    finally:
        shutil.rmtree(cache)
    print(f"wrote {HERE / 'port_filter.o'} ({(HERE / 'port_filter.o').stat().st_size} bytes)")


if __name__ == "__main__":
    main()
