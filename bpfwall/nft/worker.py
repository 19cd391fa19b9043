"""The libnftables worker for hybrid cgroup hosts: `python -m bpfwall.nft.worker`.

nft resolves `socket cgroupv2` set elements (cgroup paths) under /sys/fs/cgroup
only; on a hybrid host that is a tmpfs and cgroup2 lives at
/sys/fs/cgroup/unified, so nft fails with "cgroupv2 path fails". This process
moves into a private mount namespace of its own, mounts cgroup2 at
/sys/fs/cgroup there (the caller's view of the filesystem is untouched), and
then runs libnftables requests from stdin, one JSON line each, answering one
JSON line each on stdout:

    {"json": {"nftables": [...]}}   → {"rc": 0, "output": {...}|null, "error": ""}
    {"text": "add rule inet …"}     → {"rc": 0, "output": "", "error": ""}

Rules and sets are global to the network namespace, which the worker shares
with its parent, so what it adds is what everyone sees.
"""
from __future__ import annotations

import ctypes
import json
import os
import sys

CLONE_NEWNS = 0x00020000
MS_REC, MS_PRIVATE = 0x4000, 1 << 18
CGROUP_DIR = "/sys/fs/cgroup"


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def enter_private_cgroup2_view() -> None:
    libc = _libc()
    for ok, what in ((lambda: libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)"),
                     (lambda: libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make / private"),
                     (lambda: libc.mount(b"cgroup2", CGROUP_DIR.encode(), b"cgroup2", 0, None),
                      f"mount cgroup2 at {CGROUP_DIR}")):
        if ok() != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")


def serve(stdin, stdout) -> None:
    import nftables

    nft = nftables.Nftables()
    nft.set_json_output(True)
    for line in stdin:
        request = json.loads(line)
        if "json" in request:
            rc, output, error = nft.json_cmd(request["json"])
        else:
            rc, output, error = nft.cmd(request["text"])
        stdout.write(json.dumps({"rc": rc, "output": output, "error": error}) + "\n")
        stdout.flush()


def main() -> int:
    try:
        enter_private_cgroup2_view()
    except OSError as e:
        sys.stdout.write(json.dumps({"ready": False, "error": str(e)}) + "\n")
        sys.stdout.flush()
        return 1
    sys.stdout.write(json.dumps({"ready": True}) + "\n")
    sys.stdout.flush()
    serve(sys.stdin, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
