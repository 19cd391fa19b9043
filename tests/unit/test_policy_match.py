"""Which entry polices a cgroup: unit components, cgroup globs, precedence."""
from __future__ import annotations

import re
import signal
import time
from contextlib import contextmanager

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from bpfwall.policy import Entry, Policy, cgroup_glob_matches, unit_component

USER_APP = "user.slice/user-1000.slice/user@1000.service/app.slice"


def entry(name: str, cgroup: str | None = None, line: int = 1, file: str = "p.toml") -> Entry:
    return Entry(name=name, ingress="true", egress=None, params={}, sets={}, mode="enforce", backend="bpf",
                 set_capacity=16, cgroup=cgroup, file=file, line=line)


@pytest.mark.parametrize("path, unit", [
    ("system.slice/nginx.service", "nginx.service"),
    ("/system.slice/nginx.service/", "nginx.service"),
    (f"{USER_APP}/foo.service", "foo.service"),
    ("user.slice/user-1000.slice/session-3.scope", "session-3.scope"),
    ("user.slice", "user.slice"),
    ("init.scope", "init.scope"),
    ("system.slice/dbus.socket", "dbus.socket"),
    ("system.slice/-.mount", "-.mount"),
    ("system.slice/dev-sda2.swap", "dev-sda2.swap"),
    ("system.slice/nginx.service/sub", None),
    ("system.slice/nginx.service/sub.d", None),
    ("machine.slice/x/payload", None),
    ("", None),
    ("system.slice/.service", None),
    ("system.slice/nginx.target", None),
])
def test_unit_component(path, unit):
    assert unit_component(path) == unit


@pytest.mark.parametrize("glob, path, expected", [
    ("user@1000.service/app.slice/*", f"{USER_APP}/x.service", True),
    ("user@1000.service/app.slice/*", "user@1000.service/app.slice/x.service", True),
    ("user@1000.service/app.slice/*", f"{USER_APP}/a.slice/x.service", False),  # * never crosses '/'
    ("user@1000.service/app.slice/*", "user.slice/user-1000.slice/xuser@1000.service/app.slice/x.service", False),
    ("ser@1000.service/app.slice/*", f"{USER_APP}/x.service", False),          # aligned at a '/'
    ("user@*.service/**", f"{USER_APP}/a.slice/b.slice/x.service", True),
    ("user@*.service/**/x.service", f"{USER_APP}/x.service", True),               # ** may be empty
    ("/system.slice/*", "system.slice/nginx.service", True),                      # anchored
    ("/system.slice/*", "machine.slice/c/payload/system.slice/nginx.service", False),
    ("system.slice/*", "machine.slice/c/payload/system.slice/nginx.service", True),
    ("system.slice/nginx.service", "/system.slice/nginx.service", True),
    ("System.slice/*", "system.slice/nginx.service", False),                       # case-sensitive
    ("system.slice/ngin?.service", "system.slice/nginx.service", True),
    ("system.slice/[mn]ginx.service", "system.slice/nginx.service", True),
])
def test_cgroup_glob(glob, path, expected):
    assert cgroup_glob_matches(glob, path) is expected


def test_exact_name_beats_globs_whatever_the_order():
    star, exact = entry("*.service", line=1), entry("nginx.service", line=9)
    policy = Policy([star, exact])
    assert policy.match("system.slice/nginx.service") is exact
    assert policy.match("system.slice/other.service") is star
    report = policy.explain("system.slice/nginx.service")
    assert report.passed_over == [(star, "an exact name comes first")]
    assert report.reason == "exact name (p.toml:9)"


def test_first_glob_in_file_order_wins():
    first, second = entry("app-*.scope", file="10-a.toml"), entry("app-fire*.scope", file="20-b.toml")
    policy = Policy([first, second])
    assert policy.match(f"{USER_APP}/app-firefox-1.scope") is first
    assert policy.explain(f"{USER_APP}/app-firefox-1.scope").passed_over == [
        (second, "a glob earlier in file order matched first")]


def test_an_entry_whose_cgroup_glob_fails_is_no_candidate():
    user = entry("foo.service", cgroup="user@*.service/**")
    fallback = entry("*.service", cgroup="/system.slice/*")
    policy = Policy([user, fallback])
    assert policy.match(f"{USER_APP}/foo.service") is user
    assert policy.match("system.slice/foo.service") is fallback
    assert policy.match("machine.slice/c/payload/system.slice/foo.service") is None
    report = policy.explain("machine.slice/c/payload/system.slice/foo.service")
    assert report.reason == "every entry naming it has a cgroup glob that does not match"
    assert [e for e, _ in report.passed_over] == [user, fallback]


def test_sub_cgroups_and_non_units_match_nothing():
    policy = Policy([entry("*"), entry("nginx.service")])
    assert policy.match("system.slice/nginx.service/sub") is None
    assert policy.match("system.slice/nginx.service/sub.scope").name == "*"  # a unit-looking sub-cgroup
    report = policy.explain("system.slice/nginx.service/sub")
    assert report.unit is None and "'sub' is not a unit cgroup" in report.reason
    assert policy.explain("").reason.startswith("'(the root)' is not a unit cgroup")


def test_globs_of_units_no_longer_sit_on_slices():
    star, slices = entry("*", line=1), entry("*.slice", line=2)
    assert Policy([star]).match("system.slice") is None
    report = Policy([star]).explain("system.slice")
    assert report.passed_over == [(star, "'*' names units, not slices: only an entry whose name ends in "
                                         ".slice is a slice default")]
    assert report.reason == "no slice default names system.slice (only globs of other units match its name)"
    assert Policy([star]).explain("system.slice", legacy=True).entry is star  # the rule before
    assert Policy([star, slices]).match("system.slice") is slices
    assert Policy([star, slices]).match("system.slice/a.service") is star
    assert Policy([entry("system.slice")]).match("system.slice").name == "system.slice"


def test_no_entry_at_all():
    report = Policy([entry("a.service")]).explain("system.slice/b.service")
    assert (report.entry, report.reason, report.unit) == (None, "no entry names b.service", "b.service")
    assert report.as_dict() == {"cgroup": "system.slice/b.service", "unit": "b.service", "entry": None,
                                "reason": "no entry names b.service", "passed_over": []}


# -- properties ---------------------------------------------------------------

_PART = st.text(alphabet="ab.@-", min_size=1, max_size=5).filter(lambda p: p not in (".", ".."))
_SUFFIX = st.sampled_from([".service", ".scope", ".slice", ".socket", ".mount", ".swap"])
_UNIT = st.builds(lambda stem, suffix: stem + suffix, st.text(alphabet="ab-@", min_size=1, max_size=4), _SUFFIX)
_PATHS = st.builds(lambda parents, unit: "/".join(parents + [unit]), st.lists(_PART, max_size=4), _UNIT)
_GLOB_PART = st.one_of(_PART, st.sampled_from(["*", "?", "*.slice", "a*", "**"]))


def _glob_regex(glob: str) -> str:
    """A glob without brackets as a regex; * and ? never match '/'."""
    return "".join({"*": "[^/]*", "?": "[^/]"}.get(ch, re.escape(ch)) for ch in glob)


def _reference(glob: str, path: str) -> bool:
    """The same rules, as one regular expression over the whole path."""
    anchored = glob.startswith("/")
    parts = (glob[1:] if anchored else glob).split("/")
    regex = "".join("(?:[^/]+/)*" if p == "**" else _glob_regex(p) + "/" for p in parts)[:-1]
    return re.search(("^" if anchored else "(?:^|/)") + regex + "$", path.strip("/")) is not None


@settings(max_examples=400)
@given(st.lists(_GLOB_PART, min_size=1, max_size=4), st.booleans(), _PATHS)
def test_cgroup_glob_agrees_with_a_regex(parts, anchored, path):
    assume(parts[-1] != "**")  # the reference regex wants a plain last component
    glob = ("/" if anchored else "") + "/".join(parts)
    assert cgroup_glob_matches(glob, path) == _reference(glob, path)


@settings(max_examples=300)
@given(_PATHS, st.data())
def test_every_aligned_suffix_of_the_path_matches_itself(path, data):
    parts = path.split("/")
    k = data.draw(st.integers(0, len(parts) - 1))
    assert cgroup_glob_matches("/".join(parts[k:]), path)
    assert cgroup_glob_matches("/" + path, path)
    if len(parts[k]) > 1:
        # Cut in the middle of a component: no match, unless an aligned suffix happens to be equal.
        cut = "/".join([parts[k][1:]] + parts[k + 1:])
        aligned = any("/".join(parts[j:]) == cut for j in range(len(parts)))
        assert cgroup_glob_matches(cut, path) == aligned


@settings(max_examples=300)
@given(_PATHS, st.lists(_UNIT, max_size=4, unique=True),
       st.lists(st.sampled_from(["*", "*.service", "a*", "?*", "*.slice", "a*.slice"]), max_size=3, unique=True))
def test_precedence(path, exact_names, globs):
    entries = [entry(g, line=i) for i, g in enumerate(globs)] + [entry(n, line=10 + i) for i, n in enumerate(exact_names)]
    policy = Policy(entries)
    unit = path.rsplit("/", 1)[-1]
    got = policy.match(path)
    if unit in exact_names:
        assert got is not None and got.name == unit
    else:
        # a slice is named only by globs ending in .slice, every other unit only by the others
        matching = [e for e in entries[:len(globs)] if re.fullmatch(_glob_regex(e.name), unit)
                    and e.name.endswith(".slice") == unit.endswith(".slice")]
        assert got is (matching[0] if matching else None)
    # A sub-cgroup below the unit never matches anything.
    assert policy.match(path + "/sub") is None


def _old_matcher(glob: str, path: str) -> bool:
    """The matcher bpfwall had before the NFA: plain recursion, trying every split of the path among
    the `**`s (exponential in their number, but obviously what the rules say)."""
    from fnmatch import fnmatchcase

    def match(globs, parts):
        if not globs:
            return not parts
        if globs[0] == "**":
            return any(match(globs[1:], parts[k:]) for k in range(len(parts) + 1))
        return bool(parts) and fnmatchcase(parts[0], globs[0]) and match(globs[1:], parts[1:])

    parts = [p for p in path.split("/") if p]
    if glob.startswith("/"):
        return match(glob[1:].split("/"), parts)
    return any(match(glob.split("/"), parts[k:]) for k in range(len(parts)))


@settings(max_examples=1000)
@given(st.lists(st.one_of(_GLOB_PART, st.sampled_from(["[ab]*", "*@*", "**", "**"])), min_size=1, max_size=6),
       st.booleans(), st.one_of(_PATHS, st.lists(_PART, max_size=6).map("/".join)))
def test_cgroup_glob_agrees_with_the_old_matcher(parts, anchored, path):
    glob = ("/" if anchored else "") + "/".join(parts)
    assert cgroup_glob_matches(glob, path) is _old_matcher(glob, path)


@contextmanager
def wall_limit(seconds: float):
    """Fail (instead of hanging) when the block runs longer than `seconds`."""
    def expired(signum, frame):
        raise AssertionError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("last", ["nomatch/*", "a/x.service"])
def test_cgroup_glob_is_linear_in_depth(last):
    # 200 `**`s against a path 400 components deep: the old matcher took 36 s at depth 40 and
    # doubled with every level; the NFA does 400 * 402 component matches at most (~50 ms).
    glob = "/".join(["**", "*"] * 200) + "/" + last
    path = "/".join(["a"] * 400) + "/x.service"
    started = time.monotonic()
    with wall_limit(5.0):  # a generous bound so a busy machine cannot fail it; it only stops a hang
        assert cgroup_glob_matches(glob, path) is (last != "nomatch/*")
        assert cgroup_glob_matches("/" + glob, path) is (last != "nomatch/*")
    assert time.monotonic() - started < 1.0
