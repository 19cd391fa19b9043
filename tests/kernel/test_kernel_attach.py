"""The kernel layer's attach side: pins on bpffs, and cgroup attach/detach/query.

Each test works in a pin root and cgroups of its own (bpfwall-test-<uuid>),
removed in finally, and leaves no program, map or fd of its own behind.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from contextlib import contextmanager

import pytest

pytestmark = pytest.mark.kernel

from tests.kernel.kernel_objects import compile_test_objects, our_objects, wait_for_no_new_objects


# -- fixtures -------------------------------------------------------------------

@pytest.fixture(scope="module")
def obj(tmp_path_factory):
    from bpfwall.kernel.elf import read_object

    return read_object(compile_test_objects(tmp_path_factory.mktemp("kernel-objects"))["kernel_test"])


@pytest.fixture(autouse=True)
def no_leaks():
    """Our program and map ids are the same after the test."""
    before = our_objects()
    yield
    wait_for_no_new_objects(before)


@pytest.fixture
def pin_dir():
    from bpfwall.kernel import pins

    if not os.path.ismount("/sys/fs/bpf"):
        subprocess.run(["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"], check=True)
    path = f"/sys/fs/bpf/bpfwall-test-{uuid.uuid4().hex[:10]}"
    try:
        pins.ensure_bpffs(path)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def make_cgroup(parent: str | None = None):
    from bpfwall.kernel import cgroup

    path = os.path.join(parent or cgroup.cgroup2_mount(), f"bpfwall-test-{uuid.uuid4().hex[:10]}")
    os.mkdir(path)
    try:
        yield path
    finally:
        for top, dirs, _ in os.walk(path, topdown=False):
            for d in dirs:
                os.rmdir(os.path.join(top, d))
        os.rmdir(path)


@pytest.fixture
def cg():
    with make_cgroup() as path:
        yield path


@pytest.fixture
def loaded(obj):
    from bpfwall.kernel import loader

    with loader.load(obj) as l:
        yield l


@pytest.fixture
def loaded2(obj):
    """A second, independent copy of the object (other program ids)."""
    from bpfwall.kernel import loader

    with loader.load(obj) as l:
        yield l


INGRESS, EGRESS = "cgroup_skb/ingress", "cgroup_skb/egress"


def prog_id(fd: int) -> int:
    from bpfwall.kernel import progs

    return progs.prog_info(fd).id


def attach_exclusive(path: str, prog_fd: int, direction: str) -> None:
    """Attach the way some other tool might: no BPF_F_ALLOW_MULTI."""
    from bpfwall.kernel import syscall as sc

    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        attach_type = {"ingress": sc.BPF_CGROUP_INET_INGRESS, "egress": sc.BPF_CGROUP_INET_EGRESS}[direction]
        sc.bpf(sc.BPF_PROG_ATTACH, sc.AttachAttr(target_fd=fd, attach_bpf_fd=prog_fd, attach_type=attach_type))
    finally:
        os.close(fd)


# -- pins -------------------------------------------------------------------------

def test_pin_get_unpin(pin_dir, loaded):
    from bpfwall.kernel import maps, pins, progs
    from bpfwall.kernel.errors import KernelError

    nested = os.path.join(pin_dir, "a", "b")
    pins.ensure_bpffs(nested)
    pins.ensure_bpffs(nested)  # idempotent
    map_pin, prog_pin = os.path.join(nested, "counters"), os.path.join(nested, "ingress")
    pins.pin(loaded.maps["kt_counters"], map_pin)
    pins.pin(loaded.progs[INGRESS], prog_pin)
    assert os.path.lexists(map_pin) and os.path.lexists(prog_pin)
    fd = pins.get(map_pin)
    try:
        assert maps.map_info(fd).id == maps.map_info(loaded.maps["kt_counters"]).id
    finally:
        os.close(fd)
    fd = pins.get(prog_pin)
    try:
        assert progs.prog_info(fd).id == prog_id(loaded.progs[INGRESS])
    finally:
        os.close(fd)

    with pytest.raises(KernelError) as e:
        pins.pin(loaded.maps["kt_counters"], map_pin)
    assert str(e.value) == f"cannot pin map 'kt_counters' at {map_pin}: File exists"
    with pytest.raises(KernelError, match="bpffs refuses names containing '.'"):
        pins.pin(loaded.maps["kt_counters"], os.path.join(nested, "nginx.service"))
    with pytest.raises(KernelError, match="bpffs refuses names containing '.'"):
        pins.ensure_bpffs(os.path.join(pin_dir, "x.service", "y"))

    assert pins.unpin(map_pin) is True
    assert pins.unpin(map_pin) is False
    assert not os.path.lexists(map_pin)
    with pytest.raises(KernelError, match=f"nothing is pinned at {map_pin}"):
        pins.get(map_pin)


def test_replace_pin_is_a_rename(pin_dir, loaded, loaded2):
    from bpfwall.kernel import pins

    path = os.path.join(pin_dir, "ingress")
    pins.replace_pin(loaded.progs[INGRESS], path)  # nothing there yet: plain pin
    pins.replace_pin(loaded2.progs[INGRESS], path)
    fd = pins.get(path)
    try:
        assert prog_id(fd) == prog_id(loaded2.progs[INGRESS])
    finally:
        os.close(fd)
    assert os.listdir(pin_dir) == ["ingress"]  # no temporary pin left behind


def test_not_bpffs_says_how_to_mount(tmp_path):
    from bpfwall.kernel import pins
    from bpfwall.kernel.errors import KernelError, NotBpffs

    with pytest.raises(NotBpffs) as e:
        pins.ensure_bpffs(str(tmp_path / "pins"))
    assert isinstance(e.value, KernelError)
    assert "mount -t bpf -o mode=0700 bpf /sys/fs/bpf" in str(e.value) and str(tmp_path) in str(e.value)
    assert not (tmp_path / "pins").exists()


# -- cgroups: finding them ------------------------------------------------------------

def test_mount_resolve_and_id(cg):
    from bpfwall.kernel import cgroup, syscall as sc
    from bpfwall.kernel.errors import KernelError

    mount = cgroup.cgroup2_mount()
    assert sc.fs_magic(mount) == sc.CGROUP2_SUPER_MAGIC
    name = os.path.basename(cg)
    assert cgroup.resolve(cg) == cg
    assert cgroup.resolve(name) == cg               # relative to the mount
    assert cgroup.resolve("/" + name) == cg         # as /proc/PID/cgroup names it
    assert cgroup.resolve(cg + "/") == cg
    assert cgroup.cgroup_id(cg) == os.stat(cg).st_ino
    for bad in (name + "-missing", "/tmp"):
        with pytest.raises(KernelError, match=f"no such cgroup: {bad}"):
            cgroup.resolve(bad)


def test_walk_skips_cgroups_that_vanish(cg):
    from bpfwall.kernel import cgroup

    for sub in ("a", "b", "a/c"):
        os.mkdir(os.path.join(cg, sub))
    assert list(cgroup.walk(cg)) == [cg, f"{cg}/a", f"{cg}/a/c", f"{cg}/b"]
    walk = cgroup.walk(cg)
    assert next(walk) == cg         # cg's children are listed now
    os.rmdir(os.path.join(cg, "b"))  # and b goes away before the walk reaches it
    assert list(walk) == [f"{cg}/a", f"{cg}/a/c"]


# -- cgroups: attaching ------------------------------------------------------------------

def test_attach_query_detach(cg, loaded):
    from bpfwall.kernel import cgroup, syscall as sc

    ingress, egress = loaded.progs[INGRESS], loaded.progs[EGRESS]
    assert cgroup.query(cg, "ingress") == (0, [])
    assert cgroup.attach(cg, ingress, "ingress") is True
    assert cgroup.attach(cg, ingress, "ingress") is False  # already there: no-op
    assert cgroup.attach(cg, egress, "egress") is True
    flags, ids = cgroup.query(cg, "ingress")
    assert flags == sc.BPF_F_ALLOW_MULTI and ids == [prog_id(ingress)]
    assert cgroup.query(cg, "egress")[1] == [prog_id(egress)]
    assert cgroup.detach(cg, ingress, "ingress") is True
    assert cgroup.detach(cg, ingress, "ingress") is False
    assert cgroup.detach(cg, ingress, "egress") is False  # never attached there
    assert cgroup.query(cg, "ingress")[1] == []
    assert cgroup.detach(cg, egress, "egress") is True


def test_replace_swaps_in_place(cg, loaded, loaded2, obj):
    from bpfwall.kernel import cgroup, loader
    from bpfwall.kernel.errors import KernelError

    old, new = loaded.progs[INGRESS], loaded2.progs[INGRESS]
    with loader.load(obj) as third:
        before = third.progs[INGRESS]
        cgroup.attach(cg, before, "ingress")
        cgroup.attach(cg, old, "ingress")
        assert cgroup.attach(cg, new, "ingress", replace_fd=old) is True
        # the same place in the run order; the old program gone
        assert cgroup.query(cg, "ingress")[1] == [prog_id(before), prog_id(new)]
        assert cgroup.detach(cg, new, "ingress")
        with pytest.raises(KernelError) as e:
            cgroup.attach(cg, new, "ingress", replace_fd=old)
        assert f"cannot replace program id {prog_id(old)} on cgroup {cg}" in str(e.value)
        assert "not attached" in str(e.value)
        assert cgroup.query(cg, "ingress")[1] == [prog_id(before)]
        assert cgroup.detach(cg, before, "ingress")


def test_exclusive_holder_is_explained(cg, loaded, loaded2):
    from bpfwall.kernel import cgroup
    from bpfwall.kernel.errors import KernelError

    other = loaded2.progs[INGRESS]
    attach_exclusive(cg, other, "ingress")
    try:
        with pytest.raises(KernelError) as e:
            cgroup.attach(cg, loaded.progs[INGRESS], "ingress")
        msg = str(e.value)
        assert cg in msg and f"program id {prog_id(other)}" in msg
        assert f"bpftool cgroup detach {cg} ingress id {prog_id(other)}" in msg
        assert "BPF_F_ALLOW_MULTI" in msg and "IPIngressFilterPath" in msg
        assert cgroup.query(cg, "ingress") == (0, [prog_id(other)])
    finally:
        assert cgroup.detach(cg, other, "ingress")


def test_exclusive_ancestor_is_explained(cg, loaded, loaded2):
    from bpfwall.kernel import cgroup
    from bpfwall.kernel.errors import KernelError

    other = loaded2.progs[EGRESS]
    with make_cgroup(cg) as child:
        attach_exclusive(cg, other, "egress")
        try:
            with pytest.raises(KernelError) as e:
                cgroup.attach(child, loaded.progs[EGRESS], "egress")
            msg = str(e.value)
            assert child in msg and f"attached to its ancestor {cg} without flags" in msg
            assert f"bpftool cgroup detach {cg} egress id {prog_id(other)}" in msg
        finally:
            cgroup.detach(cg, other, "egress")


def test_find_attachments(cg, loaded, loaded2):
    from bpfwall.kernel import cgroup

    ingress, egress = loaded.progs[INGRESS], loaded.progs[EGRESS]
    unrelated = loaded2.progs[INGRESS]
    with make_cgroup(cg) as child:
        cgroup.attach(cg, ingress, "ingress")
        cgroup.attach(child, ingress, "ingress")
        cgroup.attach(child, egress, "egress")
        cgroup.attach(child, unrelated, "ingress")
        try:
            ids = {prog_id(ingress), prog_id(egress)}
            assert sorted(cgroup.find_attachments(ids)) == sorted([
                (cg, "ingress", prog_id(ingress)),
                (child, "ingress", prog_id(ingress)),
                (child, "egress", prog_id(egress)),
            ])
            assert cgroup.find_attachments(set()) == []
        finally:
            cgroup.detach(cg, ingress, "ingress")
            for fd, direction in ((ingress, "ingress"), (egress, "egress"), (unrelated, "ingress")):
                cgroup.detach(child, fd, direction)


def test_bad_direction(cg, loaded):
    from bpfwall.kernel import cgroup
    from bpfwall.kernel.errors import KernelError

    with pytest.raises(KernelError, match="direction must be"):
        cgroup.attach(cg, loaded.progs[INGRESS], "sideways")
