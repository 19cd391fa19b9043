"""The compiled-object cache's parts, no root or clang needed: entry format and checks (the checked
directories themselves: test_safefs.py).

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

from bpfwall import objcache
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
    assert err == (f"bpfwall: warning: compiling without the cache: {cache}: refused: the compiled-object cache "
                   f"{cache} is writable by group and others (mode 0777); fix: chmod go-w {cache}\n")
    link = tmp_path / "link"
    link.symlink_to(cache)
    os.chmod(cache, 0o700)
    objcache.store(cache, KEY, ELF, sample())
    assert objcache.load(link, KEY) is None
    assert f"the compiled-object cache {link} is a symbolic link (to {cache}); fix: rm {link}" in capsys.readouterr().err


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


READER_SOURCES = {2: "31f1d278"}  # READER_VERSION → sha256 prefix of kernel/elf.py + kernel/btf.py + batch.py
# (1 also after btf.parse learned enumerators: read_object made the same BpfObject; 2: batches, also
# after batch.py learned the ifaces names, and found(): only new units' headers use them, no cached
# object changes)


def test_reader_version_moves_with_the_reader():
    """Cached objects are keyed by READER_VERSION: a changed reader must bump it (then pin the new hash)."""
    here = Path(elf.__file__).parent
    sources = (here / "elf.py", here / "btf.py", here.parent / "batch.py")
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()
    assert READER_SOURCES.get(elf.READER_VERSION) == digest[:8], (
        f"kernel/elf.py, kernel/btf.py or batch.py changed (sha256 {digest[:8]}): if they can now make a "
        f"different BpfObject from the same ELF, bump READER_VERSION; then set READER_SOURCES here")


def test_a_batch_is_one_file_linked_under_each_key_and_checked_like_any_entry(tmp_path):
    cache = tmp_path / "cache"
    keys = [f"{i:02x}" * 32 for i in range(3)]
    objcache.store_batch(cache, ELF, [(k, sample()) for k in keys])
    assert sorted(os.listdir(cache)) == sorted(f"{k}{s}" for k in keys for s in (".json", ".o"))  # no temporaries
    assert len({os.stat(cache / f"{k}.o").st_ino for k in keys}) == 1 and (cache / f"{keys[0]}.o").read_bytes() == ELF
    assert all(objcache.load(cache, k) == sample() for k in keys)
    with open(cache / f"{keys[1]}.o", "r+b") as f:  # damaged through one name: every unit of the batch misses
        f.truncate(100)
    assert [objcache.load(cache, k) for k in keys] == [None] * 3
