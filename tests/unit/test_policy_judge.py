"""Which entry judges a cgroup's packets: its own (or its unit's), else the nearest slice default."""
from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpfwall.policy import Entry, Policy, judge

USER = "user.slice/user-1000.slice/user@1000.service"


def entry(name: str, cgroup: str | None = None, line: int = 1, file: str = "p.toml", ingress: str | None = "true",
          egress: str | None = "true") -> Entry:
    return Entry(name=name, ingress=ingress, egress=egress, params={}, sets={}, mode="enforce", backend="bpf",
                 set_capacity=16, cgroup=cgroup, file=file, line=line)


def test_the_issue_policy_a_unit_entry_beats_the_slice_default():
    # [units."*"] used to sit on system.slice as well, ANDed with postfix's own entry
    star, postfix, system = entry("*", line=1), entry("postfix.service", line=5), entry("system.slice", line=9)
    policy = Policy([star, postfix, system])
    j = judge(policy, "system.slice/postfix.service")
    for d in ("ingress", "egress"):
        assert (j.entry(d), j.how(d), j.judge(d).level, j.judge(d).cgroup) == \
            (postfix, "own", 2, "system.slice/postfix.service")
        assert [h.entry for h in j.shadowed(d)] == [system]
        assert j.reason(d) == "its own entry postfix.service (p.toml:5)"
    assert [h.entry for h in j.holders] == [system, postfix]
    other = judge(policy, "system.slice/cron.service")
    assert (other.entry("egress"), other.how("egress")) == (star, "own")
    # without the slice default, the glob of units does not reach the slice
    assert judge(Policy([star, postfix]), "system.slice").how("egress") == "none"


def test_a_cgroup_without_an_entry_falls_to_the_nearest_slice_default():
    system, user, user1000 = entry("system.slice"), entry("user.slice"), entry("user-1000.slice")
    policy = Policy([system, user, user1000])
    j = judge(policy, "system.slice/sshd.service")
    assert (j.entry("egress"), j.how("egress"), j.judge("egress").cgroup, j.judge("egress").level) == \
        (system, "default", "system.slice", 1)
    assert j.reason("ingress") == ("no entry of its own; the default of system.slice (level 1), the nearest slice "
                                   "with one: system.slice (p.toml:1)")
    nested = judge(policy, f"{USER}/app.slice/foo.service")
    assert (nested.entry("ingress"), nested.how("ingress"), nested.judge("ingress").level) == (user1000, "default", 2)
    assert [h.entry for h in nested.defaults] == [user, user1000]
    assert judge(policy, "system.slice").reason("egress") == \
        "the slice's own default system.slice (p.toml:1), level 1"
    assert judge(policy, "init.scope").how("ingress") == "none"
    assert judge(policy, "init.scope").reason("ingress") == "unpoliced: no entry sits on it or on any cgroup above it"
    assert judge(Policy([entry("system.slice", ingress=None)]), "system.slice/x.service").reason("ingress") == \
        "unpoliced: no entry on the way filters ingress (system.slice (p.toml:1) leave it out)"
    assert judge(policy, "").holders == ()


def test_a_direction_an_entry_leaves_out_falls_to_the_default():
    system = entry("system.slice", egress="false")
    nginx = entry("nginx.service", ingress="tcp", egress=None, line=4)
    j = judge(Policy([system, nginx]), "system.slice/nginx.service")
    assert (j.entry("ingress"), j.how("ingress")) == (nginx, "own")
    assert (j.entry("egress"), j.how("egress")) == (system, "default")
    assert j.reason("egress").endswith("; nginx.service (p.toml:4) on nginx.service leaves egress out")
    with pytest.raises(ValueError):
        j.judge("both")


def test_sub_cgroups_are_judged_by_their_unit():
    nginx, system = entry("nginx.service"), entry("system.slice")
    j = judge(Policy([nginx, system]), "system.slice/nginx.service/worker/x")
    assert (j.entry("ingress"), j.how("ingress"), j.judge("ingress").cgroup) == \
        (nginx, "own", "system.slice/nginx.service")
    assert j.reason("ingress").startswith("inside nginx.service (level 2), whose entry covers its sub-cgroups")
    # a unit without an entry: its sub-cgroups fall to the slice with it
    assert judge(Policy([system]), "system.slice/cron.service/sub").entry("egress") is system


def test_globs_of_slices_and_cgroup_globs():
    users = entry("user-*.slice", cgroup="/user.slice/*", line=1)
    apps = entry("*.slice", cgroup="user@*.service/*", line=2)
    policy = Policy([users, apps])
    assert judge(policy, f"{USER}/session.slice/dbus.service").entry("egress") is apps
    deeper = judge(policy, f"{USER}/session.slice/a.slice/x.service")  # a.slice is two below user@: no match
    assert (deeper.entry("egress"), deeper.judge("egress").level, [h.entry for h in deeper.defaults]) == \
        (apps, 4, [users, apps])
    assert judge(policy, "user.slice/user-1000.slice/x.scope").entry("egress") is users
    assert judge(policy, "machine.slice/user-1000.slice/x.service").how("egress") == "none"


def test_as_dict():
    j = judge(Policy([entry("system.slice", ingress=None)]), "/system.slice/a.service/")
    slice_holder = {"level": 1, "cgroup": "system.slice", "entry": "system.slice", "file": "p.toml", "line": 1,
                    "slice_default": True, "directions": ["egress"]}
    assert j.as_dict() == {
        "cgroup": "system.slice/a.service", "level": 2, "holders": [slice_holder],
        "ingress": {"how": "none", "reason": j.reason("ingress"), "judge": None},
        "egress": {"how": "default", "reason": j.reason("egress"), "judge": slice_holder}}


# -- the rule stated by brute force ---------------------------------------------

_STEM = st.text(alphabet="ab-@", min_size=1, max_size=3)
_SUFFIX = st.sampled_from([".service", ".scope", ".slice", ".socket"])
_COMPONENT = st.one_of(st.builds(str.__add__, _STEM, _SUFFIX), st.sampled_from(["sub", "payload", "a.b"]))
_PATH = st.lists(_COMPONENT, max_size=6).map("/".join)
_NAME = st.one_of(st.builds(str.__add__, _STEM, _SUFFIX),
                  st.sampled_from(["*", "*.slice", "a*.slice", "*.service", "a*", "?*", "*e", "b*.scope"]))
_CGROUP = st.one_of(st.none(), st.sampled_from(["**", "/**", "a*.slice/*", "/*", "*/*", "**/sub/*", "/a.slice/**"]))


def _regex(glob: str) -> str:
    return "".join({"*": "[^/]*", "?": "[^/]"}.get(ch, re.escape(ch)) for ch in glob)


_DIRECTIONS = st.sampled_from([("true", "true"), ("true", None), (None, "true")])


def _sits_on(e: Entry, prefix: list[str]) -> bool:
    """Does entry e apply to the cgroup at this path, by the rule as the README writes it?"""
    last = prefix[-1]
    looks_like_unit = re.fullmatch(r".+\.(service|scope|slice|socket|mount|swap)", last) is not None
    if not looks_like_unit or not re.fullmatch(_regex(e.name), last):
        return False
    if e.name.endswith(".slice") != last.endswith(".slice"):
        return False  # slice defaults sit on slices only, unit entries never on a slice
    if e.cgroup is None:
        return True
    anchored = e.cgroup.startswith("/")
    globs = (e.cgroup[1:] if anchored else e.cgroup).split("/")
    body = "".join("(?:[^/]+/)*" if g == "**" else _regex(g) + "/" for g in globs)
    return re.search(("^" if anchored else "(?:^|/)") + body + "$", "/".join(prefix) + "/") is not None


def _brute_force(entries: list[Entry], path: str, direction: str | None) -> tuple[int, Entry] | None:
    """Every (level, entry) that sits anywhere on the path; at one level an exact name beats globs,
    then the first in policy order sits there; of those filtering the direction (None: any), the
    deepest judges."""
    parts = [p for p in path.split("/") if p]
    found = [(level, -int("*" not in e.name and "?" not in e.name), i, e)
             for level in range(1, len(parts) + 1) for i, e in enumerate(entries) if _sits_on(e, parts[:level])]
    sitting = {}
    for level, _, _, e in sorted(found, key=lambda f: (f[0], f[1], f[2])):
        sitting.setdefault(level, e)
    judging = [(level, e) for level, e in sitting.items() if direction is None or getattr(e, direction) is not None]
    return max(judging, key=lambda f: f[0]) if judging else None


@settings(max_examples=600)
@given(st.lists(st.tuples(_NAME, _CGROUP, _DIRECTIONS), max_size=6, unique_by=lambda t: t[0]), _PATH)
def test_judge_agrees_with_the_brute_force_rule(specs, path):
    entries = [entry(name, cgroup, line=i + 1, ingress=i_, egress=e_)
               for i, (name, cgroup, (i_, e_)) in enumerate(specs)]
    j = judge(Policy(entries), path)
    for d in ("ingress", "egress"):
        expected = _brute_force(entries, path, d)
        got = None if j.judge(d) is None else (j.judge(d).level, j.judge(d).entry)
        assert got == expected
        assert j.how(d) == ("none" if expected is None else "default" if expected[1].name.endswith(".slice")
                            else "own")
    # every holder on the path is the one the brute force seats at its level, and levels ascend
    parts = path.split("/")
    for h in j.holders:
        assert h.cgroup == "/".join(parts[:h.level]) and _brute_force(entries, h.cgroup, None) == (h.level, h.entry)
    assert [h.level for h in j.holders] == sorted({h.level for h in j.holders})


@pytest.mark.parametrize("name", ["system.slice", "*.slice", "user-*.slice", "a?.slice", "[ab]*.slice"])
def test_names_ending_in_slice_are_slice_defaults(name):
    assert entry(name).is_slice_default


@pytest.mark.parametrize("name", ["*", "*.service", "app-*", "*.s*", "*e", "x.slice.scope"])
def test_other_names_are_unit_entries(name):
    assert not entry(name).is_slice_default
