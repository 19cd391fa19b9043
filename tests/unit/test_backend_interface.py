"""Both backends implement the whole Backend interface (backends/base.py) with its parameters,
their watcher handles the whole Handle interface, and the factory is what builds them."""
from __future__ import annotations

import inspect

import pytest

from bpfwall import backends
from bpfwall.backends.base import Backend, Handle, ProgramBackend
from bpfwall.backends.bpf_backend import BpfBackend, UnitHandle
from bpfwall.backends.nft_backend import NftBackend, NftUnit


def _methods(protocol) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(fn) for name, fn in vars(protocol).items()
            if callable(fn) and not name.startswith("_")}


@pytest.mark.parametrize("protocol,classes", [(Backend, (BpfBackend, NftBackend)), (Handle, (UnitHandle, NftUnit))],
                         ids=["Backend", "Handle"])
def test_every_operation_is_implemented_twice_with_its_parameters(protocol, classes):
    for cls in classes:
        for name, signature in _methods(protocol).items():
            assert callable(getattr(cls, name, None)), f"{cls.__name__}.{name} is missing"
            assert list(inspect.signature(getattr(cls, name)).parameters) == list(signature.parameters), \
                f"{cls.__name__}.{name}{inspect.signature(getattr(cls, name))} is not {name}{signature}"
        for attribute in ("backend", "exclusive", "needs_cleanup") if protocol is Handle else ("name",):
            assert hasattr(cls, attribute), f"{cls.__name__}.{attribute} is missing"


def test_the_factory_builds_each_from_the_options(tmp_path):
    bpf = backends.create("bpf", pin_root=str(tmp_path / "pins"), cache=tmp_path / "cache")
    nft = backends.create("nft", table="bpfwall-test-x")
    assert (type(bpf), bpf.pin_root, bpf.cache) == (BpfBackend, str(tmp_path / "pins"), tmp_path / "cache")
    assert (type(nft), nft.table) == (NftBackend, "bpfwall-test-x")
    assert {n: type(b) for n, b in backends.every(pin_root="/x").items()} == {"bpf": BpfBackend, "nft": NftBackend}
    assert all(b.name == n for n, b in backends.every().items())
    with pytest.raises(ValueError):
        backends.create("iptables")


def test_only_pinned_programs_are_a_program_backend():
    bpf, nft = backends.create("bpf"), backends.create("nft")
    assert backends.programs(bpf, "pin") is bpf and isinstance(bpf, ProgramBackend)
    from bpfwall.errors import UsageError

    with pytest.raises(UsageError, match="^pin: only the bpf backend has this command$"):
        backends.programs(nft, "pin")
