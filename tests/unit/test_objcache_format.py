"""The compiled-object cache's parts, no root or clang needed: entry format, checks, checked directories.

The attacks (other owners, a race for the directory, foreign objects in the
kernel) are in tests/kernel/test_build_cache.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from bpfwall import checked_dir, objcache
from bpfwall.kernel import elf
from bpfwall.kernel.elf import BpfObject, MapDef, ProgDef

KEY = "ab" * 32
ELF = b"\x7fELF" + bytes(range(256)) * 4


def sample() -> BpfObject:
    obj = BpfObject(license="GPL", btf=b"\x9f\xeb\x01\x00btf")
    obj.maps["counters"] = MapDef("counters", 6, 4, 16, 4, 0, 3, 5)
    obj.maps["meta"] = MapDef("meta", 2, 4, 512, 1, 1 << 31, 7, 8)
    obj.programs["cgroup_skb/ingress"] = ProgDef(
        "cgroup_skb/ingress", "ingress", b"\x18" + bytes(15) + b"\x95" + bytes(7),
        [(0, "counters")], b"\1" * 8, b"\2" * 16)
    return obj


@pytest.fixture
def cache(tmp_path):
    d = tmp_path / "cache"
    d.mkdir(mode=0o700)
    objcache.store(d, KEY, ELF, sample())
    return d


def _rewrite_meta(cache: Path, **changes) -> None:
    path = cache / f"{KEY}.json"
    meta = json.loads(path.read_bytes())
    meta.update(changes)
    path.write_text(json.dumps(meta))


# -- the entry -------------------------------------------------------------------------

def test_store_then_load_gives_the_same_object_as_plain_files(cache):
    assert objcache.load(cache, KEY) == sample()
    assert sorted(os.listdir(cache)) == [f"{KEY}.json", f"{KEY}.o"]  # no temporaries, no pickle
    assert (cache / f"{KEY}.o").read_bytes() == ELF
    meta = json.loads((cache / f"{KEY}.json").read_bytes())
    assert (meta["key"], meta["reader"], meta["elf_sha256"]) == (KEY, elf.READER_VERSION,
                                                                 hashlib.sha256(ELF).hexdigest())
    for name in os.listdir(cache):
        assert stat.S_IMODE(os.stat(cache / name).st_mode) == 0o600


def test_no_entry_is_a_miss(cache, tmp_path):
    assert objcache.load(cache, "cd" * 32) is None
    assert objcache.load(tmp_path / "none", KEY) is None
    assert not (tmp_path / "none").exists()  # reading creates nothing


@pytest.mark.parametrize("change", [
    {"key": "cd" * 32},                      # an entry moved here from another key
    {"reader": elf.READER_VERSION + 1},      # read by another version of bpfwall's ELF/BTF reader
    {"format": objcache.FORMAT + 1},
    {"elf_sha256": "00" * 32},
    {"object_sha256": "00" * 32},
])
def test_an_entry_that_does_not_match_its_key_is_a_miss(cache, change):
    _rewrite_meta(cache, **change)
    assert objcache.load(cache, KEY) is None


def test_an_object_edited_inside_the_metadata_is_a_miss(cache):
    meta = json.loads((cache / f"{KEY}.json").read_bytes())
    meta["object"]["license"] = "Proprietary"
    (cache / f"{KEY}.json").write_text(json.dumps(meta))
    assert objcache.load(cache, KEY) is None


@pytest.mark.parametrize("name, data", [
    (f"{KEY}.o", ELF[:100]),                  # truncated ELF
    (f"{KEY}.o", b""),
    (f"{KEY}.json", b""),
    (f"{KEY}.json", b"{\"key\": "),         # truncated JSON
    (f"{KEY}.json", b"\xff\xfe not utf-8"),
    (f"{KEY}.json", b"[]"),
    (f"{KEY}.json", b"[" * 100_000 + b"]" * 100_000),  # deeper than the JSON parser recurses
])
def test_a_corrupted_entry_is_a_miss(cache, name, data):
    (cache / name).write_bytes(data)
    assert objcache.load(cache, KEY) is None


def test_every_truncation_and_every_flipped_byte_of_the_metadata_is_a_miss(cache):
    good = (cache / f"{KEY}.json").read_bytes()
    for i in range(0, len(good), max(1, len(good) // 300)):
        for data in (good[:i], good[:i] + bytes([good[i] ^ 0x01]) + good[i + 1:]):
            (cache / f"{KEY}.json").write_bytes(data)
            assert objcache.load(cache, KEY) is None, (i, data[i - 20:i + 20])


@pytest.mark.parametrize("make", [
    lambda p: (p.unlink(), p.symlink_to(p.with_name("real"))),
    lambda p: os.chmod(p, 0o666),
    lambda p: os.chmod(p, 0o620),
    lambda p: (p.unlink(), p.mkdir()),
    lambda p: (p.unlink(), os.mkfifo(p)),       # would block a plain open()
])
@pytest.mark.parametrize("suffix", [".json", ".o"])
def test_an_entry_file_that_is_not_a_private_regular_file_is_a_miss(cache, make, suffix):
    path = cache / f"{KEY}{suffix}"
    path.with_name("real").write_bytes(path.read_bytes())
    make(path)
    assert objcache.load(cache, KEY) is None


def test_a_miss_is_rewritten_by_the_next_store(cache):
    os.chmod(cache / f"{KEY}.json", 0o666)
    assert objcache.load(cache, KEY) is None
    objcache.store(cache, KEY, ELF, sample())
    assert objcache.load(cache, KEY) == sample()


def test_an_untrusted_cache_dir_is_neither_read_nor_written_and_warned_about_once(cache, tmp_path, capsys):
    os.chmod(cache, 0o777)
    assert objcache.load(cache, KEY) is None
    os.unlink(cache / f"{KEY}.json")
    objcache.store(cache, KEY, ELF, sample())
    assert not (cache / f"{KEY}.json").exists()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"bpfwall: warning: not using the compiled-object cache {cache}: ")
    assert f"{cache} is writable by group or others (mode 0777)" in err and "BPFWALL_CACHE_DIR" in err
    link = tmp_path / "link"
    link.symlink_to(cache)
    os.chmod(cache, 0o700)
    objcache.store(cache, KEY, ELF, sample())
    assert objcache.load(link, KEY) is None
    assert f"{link} is a symbolic link" in capsys.readouterr().err


def test_store_creates_missing_directories_private(tmp_path):
    deep = tmp_path / "a" / "b"
    objcache.store(deep, KEY, ELF, sample())
    assert objcache.load(deep, KEY) == sample()
    for d in (tmp_path / "a", deep):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700


# -- BpfObject as JSON ----------------------------------------------------------------

def test_plain_form_round_trips_through_json():
    plain = objcache.to_plain(sample())
    assert objcache.from_plain(json.loads(json.dumps(plain))) == sample()


@pytest.mark.parametrize("edit", [
    lambda d: d.update(extra=1),
    lambda d: d.pop("btf"),
    lambda d: d.update(license=None),
    lambda d: d.update(btf="not base64!"),
    lambda d: d["maps"][0].update(max_entries=True),
    lambda d: d["maps"][0].update(max_entries=-1),
    lambda d: d["maps"][0].update(max_entries=1 << 32),
    lambda d: d["maps"][0].update(flags="0"),
    lambda d: d["maps"].append(dict(d["maps"][0])),
    lambda d: d.update(maps={}),
    lambda d: d["programs"][0].update(insns=123),
    lambda d: d["programs"][0].update(map_relocs=[[0, "nope"]]),
    lambda d: d["programs"][0].update(map_relocs=[[0]]),
    lambda d: d["programs"].append(dict(d["programs"][0])),
])
def test_plain_form_with_a_wrong_shape_is_refused(edit):
    plain = objcache.to_plain(sample())
    edit(plain)
    with pytest.raises(ValueError):
        objcache.from_plain(plain)


READER_SOURCES = {1: "cfa60e0f"}  # READER_VERSION → sha256 prefix of kernel/elf.py + kernel/btf.py
# (1 also after btf.parse learned enumerators: read_object makes the same BpfObject)


def test_reader_version_moves_with_the_reader():
    """Cached objects are keyed by READER_VERSION: a changed reader must bump it (then pin the new hash)."""
    here = Path(elf.__file__).parent
    digest = hashlib.sha256((here / "elf.py").read_bytes() + (here / "btf.py").read_bytes()).hexdigest()
    assert READER_SOURCES.get(elf.READER_VERSION) == digest[:8], (
        f"kernel/elf.py or kernel/btf.py changed (sha256 {digest[:8]}): if read_object can now make a "
        f"different BpfObject from the same ELF, bump READER_VERSION; then set READER_SOURCES here")


# -- checked directories ---------------------------------------------------------------

def test_open_dir_walks_through_a_sticky_world_writable_dir(tmp_path):
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)  # like /tmp: others may add entries, not rename ours
    fd = checked_dir.open_dir(str(sticky / "mine"), create=True)
    os.close(fd)
    with pytest.raises(checked_dir.UntrustedPath, match="writable by group or others"):
        checked_dir.open_dir(str(sticky))  # but not as the directory itself


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o770])
def test_open_dir_refuses_a_writable_directory_anywhere_on_the_path(tmp_path, mode):
    (tmp_path / "a" / "b").mkdir(parents=True)
    os.chmod(tmp_path / "a", mode)
    with pytest.raises(checked_dir.UntrustedPath) as info:
        checked_dir.open_dir(str(tmp_path / "a" / "b"))
    assert str(info.value) == f"{tmp_path / 'a'} is writable by group or others (mode {mode:04o})"


def test_open_dir_refuses_symlinks_and_files_on_the_path(tmp_path):
    (tmp_path / "real" / "c").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "file").write_text("")
    with pytest.raises(checked_dir.UntrustedPath, match=f"^{tmp_path / 'link'} is a symbolic link$"):
        checked_dir.open_dir(str(tmp_path / "link" / "c"), create=True)
    with pytest.raises(checked_dir.UntrustedPath, match="is not a directory"):
        checked_dir.open_dir(str(tmp_path / "file" / "c"), create=True)
    assert os.listdir(tmp_path / "real") == ["c"]


def test_write_file_replaces_atomically_and_leaves_no_temporaries(tmp_path):
    fd = checked_dir.open_dir(str(tmp_path))
    try:
        (tmp_path / "x").symlink_to("/etc/passwd")
        checked_dir.write_file(fd, "x", b"one")
        checked_dir.write_file(fd, "x", b"two")
        assert checked_dir.read_file(fd, "x", 3) == b"two"
        with pytest.raises(ValueError, match="larger than 2 bytes"):
            checked_dir.read_file(fd, "x", 2)
    finally:
        os.close(fd)
    assert os.listdir(tmp_path) == ["x"] and not (tmp_path / "x").is_symlink()
