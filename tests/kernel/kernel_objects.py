"""What the kernel-layer tests share: the tiny test programs, compiled, and a leak check on them."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


def compile_test_objects(out: Path) -> dict[str, str]:
    """kernel_test*.c compiled into `out`: {stem: object path}."""
    if not shutil.which("clang"):
        pytest.skip("clang is not installed")
    paths = {}
    for src in DATA.glob("kernel_test*.c"):
        obj = out / f"{src.stem}.o"
        subprocess.run(["clang", "-O2", "-g", "-target", "bpf", "-Wall",
                        f"-I/usr/include/{platform.machine()}-linux-gnu", "-c", str(src), "-o", str(obj)],
                       check=True)
        paths[src.stem] = str(obj)
    return paths


def our_objects() -> tuple[set[int], set[int]]:
    """Ids of live programs and maps named kt_* (the test programs'): other
    processes may load and free their own objects while we run."""
    from bpfwall.kernel import maps, progs
    from bpfwall.kernel.errors import KernelError

    out = []
    for next_id, get_fd, info in ((progs.prog_get_next_id, progs.prog_get_fd_by_id, progs.prog_info),
                                  (progs.map_get_next_id, progs.map_get_fd_by_id, maps.map_info)):
        ids, cur = set(), 0
        while (cur := next_id(cur)) is not None:
            try:
                fd = get_fd(cur)
            except KernelError:
                continue  # freed meanwhile
            try:
                if info(fd).name.startswith("kt_"):
                    ids.add(cur)
            finally:
                os.close(fd)
        out.append(ids)
    return out[0], out[1]


def wait_for_no_new_objects(before: tuple[set[int], set[int]]) -> None:
    """Closed fds and detached programs are freed asynchronously: wait a little."""
    deadline = time.monotonic() + 5
    while (after := our_objects()) != before:
        if time.monotonic() > deadline:
            raise AssertionError(f"leaked programs {sorted(after[0] - before[0])}, maps {sorted(after[1] - before[1])}")
        time.sleep(0.05)
