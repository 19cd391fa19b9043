"""What a set capacity costs, and the bound above which it must be forced (issue 8, item 8).
The figures themselves are checked against the kernel in tests/kernel/test_sets.py."""
from __future__ import annotations

import textwrap

import pytest

from bpfwall import capacity
from bpfwall.policy import check_policy


def test_a_number_set_costs_its_preallocated_hash():
    # 64 bytes an element plus 16 a bucket, buckets rounded up to a power of two.
    fixed = capacity.set_map_bytes("number", 1) - 64 - 16
    assert capacity.set_map_bytes("number", 4096) == 80 * 4096 + fixed
    assert capacity.set_map_bytes("number", 5000) == 64 * 5000 + 16 * 8192 + fixed
    assert capacity.set_map_bytes("address", 1000) == 128 * 1000
    four = {n: "number" for n in "abcd"}
    assert capacity.estimate(four, 1 << 24) > 5 << 30  # the 5.2 GB of the issue
    assert capacity.estimate({}, 1 << 24) == 0


def test_check_refuses_naming_the_estimate_and_the_option():
    sets = {"s": "number", "t": "number", "a": "address"}
    with pytest.raises(capacity.CapacityError) as e:
        capacity.check(sets, 1 << 22, False, "--set-capacity 4194304", "--force-capacity")
    assert str(e.value) == ("--set-capacity 4194304: the unit's sets would take about 1.1 GiB of kernel memory "
                            "(2 number sets of 320 MiB each, taken when loaded; 1 address set of 512 MiB, "
                            "when full); bpfwall takes at most 256 MiB per unit unless forced with --force-capacity")
    capacity.check(sets, 1 << 22, True, "x", "y")  # forced
    capacity.check({}, 1 << 24, False, "x", "y")  # no sets: nothing to pay for
    capacity.check({"s": "number", "a": "address"}, 1 << 20, False, "x", "y")  # 80 + 128 MiB
    with pytest.raises(capacity.CapacityError, match="about 288 MiB"):
        capacity.check(sets, 1 << 20, False, "x", "y")  # 80 + 80 + 128 MiB
    with pytest.raises(capacity.CapacityError, match="must be between 1 and 16777216"):
        capacity.check(sets, (1 << 24) + 1, True, "x", "y")
    with pytest.raises(capacity.CapacityError, match="^x: must be between"):
        capacity.check({}, 0, True, "x", "y")


def errors(tmp_path, text: str) -> list[str]:
    path = tmp_path / "p.toml"
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    _, found = check_policy(files=[str(path)])
    return [e.replace(str(tmp_path) + "/", "") for e in found]


def test_policy_capacity_bound(trusted_tmp_path):
    tmp_path = trusted_tmp_path
    unit = '[units."a.service"]\ningress = "dst_port in @s"\nsets.s = []\n'
    assert errors(tmp_path, unit + "set_capacity = 16777216\n") == [
        'p.toml:4: units."a.service".set_capacity: the unit\'s sets would take about 1.3 GiB of kernel memory '
        "(1 number set of 1.3 GiB, taken when loaded); bpfwall takes at most 256 MiB per unit unless forced "
        "with force_capacity = true"]
    assert errors(tmp_path, unit + "set_capacity = 16777216\nforce_capacity = true\n") == []
    defaults = "[defaults]\nset_capacity = 16777216\n"
    assert errors(tmp_path, defaults + unit) == [
        'p.toml:3: units."a.service": set_capacity 16777216 (from [defaults]): the unit\'s sets would take about '
        "1.3 GiB of kernel memory (1 number set of 1.3 GiB, taken when loaded); bpfwall takes at most 256 MiB "
        "per unit unless forced with force_capacity = true"]
    assert errors(tmp_path, defaults + "force_capacity = true\n" + unit) == []
    assert errors(tmp_path, unit + 'force_capacity = "yes"\n') == [
        'p.toml:4: units."a.service".force_capacity: expected true or false, got a string']
