"""Policy files: parsing, every kind of error with its FILE:LINE, loading a directory, fingerprints."""
from __future__ import annotations

import ipaddress
import os
import textwrap
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpfwall.build import DEFAULT_SET_CAPACITY, UnitProgram
from bpfwall.errors import UserError
from bpfwall.lang.checker import analyze_pair
from bpfwall.policy import PolicyError, check_policy, load_policy, policy_files
from bpfwall.policy.locate import key_lines, line_of, syntax_error_line

REPO = Path(__file__).resolve().parents[2]


def write(directory: Path, name: str, text: str) -> str:
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return str(path)


def errors_of(trusted_tmp_path, text: str, name: str = "p.toml") -> list[str]:
    """The errors of one file, with the file's path shortened to its name."""
    file = write(trusted_tmp_path, name, text)
    policy, errors = check_policy(files=[file])
    assert (policy is None) == bool(errors)
    return [e.replace(str(trusted_tmp_path) + "/", "") for e in errors]


def one_error(trusted_tmp_path, text: str) -> str:
    errors = errors_of(trusted_tmp_path, text)
    assert len(errors) == 1, errors
    return errors[0]


# -- a valid policy -----------------------------------------------------------

def test_full_entry_with_defaults_and_overrides(trusted_tmp_path):
    file = write(trusted_tmp_path, "a.toml", """
        [defaults]
        backend = "nft"
        mode = "audit"
        set_capacity = 100

        [units."nginx.service"]
        ingress = "tcp && local_port in {80, 443, $admin_port}"
        egress  = "udp && remote_port == 53 || tcp"
        params  = { admin_port = 8443 }

        [units."app-*.scope"]
        egress = "daddr in @admins || dst_port in @ports"
        sets = { admins = ["10.0.0.0/8", "2001:db8::/32"], ports = ["80", 443, "8000..8100"] }
        mode = "enforce"
        backend = "bpf"
        set_capacity = 5000
        cgroup = "user@1000.service/app.slice/*"
    """)
    policy = load_policy(files=[file])
    nginx, app = policy.entries
    assert (nginx.name, nginx.file, nginx.line) == ("nginx.service", file, 6)
    assert nginx.ingress == "tcp && local_port in {80, 443, $admin_port}"
    assert nginx.egress == "udp && remote_port == 53 || tcp"
    assert nginx.params == {"admin_port": 8443} and nginx.sets == {}
    assert (nginx.mode, nginx.backend, nginx.set_capacity, nginx.cgroup) == ("audit", "nft", 100, None)
    assert (app.name, app.line, app.ingress) == ("app-*.scope", 11, None)
    assert app.sets == {"admins": [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32")],
                        "ports": [80, 443, (8000, 8100)]}
    assert (app.mode, app.backend, app.set_capacity) == ("enforce", "bpf", 5000)
    assert app.cgroup == "user@1000.service/app.slice/*"
    assert policy.entry("app-*.scope") is app and policy.entry("app-x.scope") is None


def test_builtin_defaults_apply_per_file(trusted_tmp_path):
    a = write(trusted_tmp_path, "a.toml", """
        [defaults]
        mode = "audit"
        [units."a.service"]
        ingress = "true"
    """)
    b = write(trusted_tmp_path, "b.toml", """
        [units."b.service"]
        ingress = "true"
    """)
    first, second = load_policy(files=[a, b]).entries
    assert first.mode == "audit"
    assert (second.mode, second.backend, second.set_capacity) == ("enforce", "bpf", DEFAULT_SET_CAPACITY)


def test_program_is_checked_and_built(trusted_tmp_path):
    file = write(trusted_tmp_path, "a.toml", """
        [units."a.service"]
        ingress = "tcp && dst_port == $zed || saddr in @nets"
        egress = "udp && dst_port == $alpha"
        params = { zed = 1, alpha = 2 }
        sets = { nets = [] }
        set_capacity = 7
    """)
    program = load_policy(files=[file]).entries[0].program()
    assert isinstance(program, UnitProgram)
    assert program.ingress.text == "tcp && dst_port == $zed || saddr in @nets"
    assert program.egress.text == "udp && dst_port == $alpha"
    assert program.params == ["alpha", "zed"] and program.sets == {"nets": "address"}
    assert program.set_capacity == 7


def test_example_policy_passes():
    files = sorted(str(p) for p in (REPO / "examples" / "policy").glob("*.toml"))
    assert files
    policy, errors = check_policy(files=files)
    assert errors == []
    for entry in policy.entries:
        entry.program()


def test_empty_file_and_empty_units_are_valid(trusted_tmp_path):
    assert load_policy(files=[write(trusted_tmp_path, "a.toml", "")]).entries == []
    assert load_policy(files=[write(trusted_tmp_path, "b.toml", "[units]\n")]).entries == []


def test_multiline_expression(trusted_tmp_path):
    file = write(trusted_tmp_path, "a.toml", '''
        [units."a.service"]
        ingress = """
            icmp
            || tcp && dst_port == 80
        """
    ''')
    assert load_policy(files=[file]).entries[0].program().ingress.text == "icmp || tcp && dst_port == 80"


# -- errors: every message names the file, the line and the key ---------------

def test_syntax_error_has_the_line(trusted_tmp_path):
    assert one_error(trusted_tmp_path, """
        [units."a.service"]
        ingress = "tcp"
        egress = "udp
    """) == "p.toml:3: Illegal character '\\n'"


def test_syntax_error_at_end_of_document(trusted_tmp_path):
    assert one_error(trusted_tmp_path, "a = 1\n\nb =") == "p.toml:3: Invalid value (at the end of the file)"


def test_syntax_error_line_parsing():
    assert syntax_error_line("Bad thing (at line 12, column 3)", "") == (12, "Bad thing")
    assert syntax_error_line("Odd", "x\ny\n") == (1, "Odd")


@pytest.mark.parametrize("text, expected", [
    ('unit = {}\n', "p.toml:1: unit: unknown key 'unit'; did you mean 'units'?"),
    ('[default]\nmode = "audit"\n', "p.toml:1: default: unknown key 'default'; did you mean 'defaults'?"),
    ('[defaults]\nmdoe = "audit"\n', "p.toml:2: defaults.mdoe: unknown key 'mdoe'; did you mean 'mode'?"),
    ('[defaults]\ncolour = 1\n',
     "p.toml:2: defaults.colour: unknown key 'colour'; allowed: backend, mode, set_capacity, force_capacity, log_rate, log_burst, compiler"),
    ('[units."a.service"]\ningres = "tcp"\negress = "tcp"\n',
     "p.toml:2: units.\"a.service\".ingres: unknown key 'ingres'; did you mean 'ingress' or 'egress'?"),
    ('[units."a.service"]\negress = "tcp"\nparam = { x = 1 }\n',
     "p.toml:3: units.\"a.service\".param: unknown key 'param'; did you mean 'params'?"),
])
def test_unknown_keys_suggest(trusted_tmp_path, text, expected):
    assert one_error(trusted_tmp_path, text) == expected


@pytest.mark.parametrize("body, expected", [
    ('ingress = 5', 'p.toml:2: units."a.service".ingress: expected a string (a filter expression), got an integer'),
    ('ingress = ["tcp"]', 'p.toml:2: units."a.service".ingress: expected a string (a filter expression), '
                          'got an array'),
    ('egress = "tcp"\nparams = 3', 'p.toml:3: units."a.service".params: expected a table (name = number), '
                                   'got an integer'),
    ('egress = "tcp"\nmode = true', "p.toml:3: units.\"a.service\".mode: expected a string ('enforce' or "
                                    "'audit'), got a boolean"),
    ('egress = "tcp"\nmode = "enforcing"', "p.toml:3: units.\"a.service\".mode: must be 'enforce' or 'audit', "
                                           "not 'enforcing'; did you mean 'enforce'?"),
    ('egress = "tcp"\nbackend = "ebpf"', "p.toml:3: units.\"a.service\".backend: must be 'bpf' or 'nft', "
                                         "not 'ebpf'; did you mean 'bpf'?"),
    ('egress = "tcp"\nset_capacity = "big"', 'p.toml:3: units."a.service".set_capacity: expected an integer '
                                             '(elements each @set can hold), got a string'),
    ('egress = "tcp"\nset_capacity = 0', 'p.toml:3: units."a.service".set_capacity: 0 is out of range '
                                         '(1..16777216)'),
    ('egress = "tcp"\ncgroup = 1.5', 'p.toml:3: units."a.service".cgroup: expected a string (a glob on the '
                                     'cgroup path), got a float'),
    ('egress = "tcp"\ncgroup = "a.slice//a.service"', "p.toml:3: units.\"a.service\".cgroup: "
                                                      "'a.slice//a.service' is not a cgroup path glob: no empty "
                                                      "components (e.g. 'user@1000.service/app.slice/*')"),
    ('egress = "tcp"\ncgroup = "app.slice"', "p.toml:3: units.\"a.service\".cgroup: 'app.slice' never matches "
                                             "a.service: it is matched against the path of the unit's own cgroup, "
                                             "which ends in a.service; did you mean 'app.slice/*'?"),
    ('mode = "audit"', 'p.toml:1: units."a.service": give ingress, egress or both (each a filter expression)'),
])
def test_wrong_types_and_values(trusted_tmp_path, body, expected):
    assert one_error(trusted_tmp_path, '[units."a.service"]\n' + body + "\n") == expected


def test_units_must_be_tables(trusted_tmp_path):
    assert one_error(trusted_tmp_path, 'units = 3\n') == \
        "p.toml:1: units: expected a table (one [units.\"NAME\"] table per unit), got an integer"
    assert one_error(trusted_tmp_path, '[units]\n"a.service" = "tcp"\n') == \
        'p.toml:2: units."a.service": expected a table (ingress, egress, params, sets, mode, backend, ' \
        'set_capacity, force_capacity, cgroup, log_rate, log_burst, strict, ip_address_allow, ip_address_deny, compiler), got a string'


@pytest.mark.parametrize("name, expected", [
    ("nginx service", "invalid unit name 'nginx service': character ' ' cannot occur in a systemd unit name "
                      "(allowed: letters, digits and : - _ . \\ @)"),
    ("nginx", "'nginx' is not a unit name: it must end in .service, .scope, .slice, .socket, .mount or .swap"),
    (".service", "invalid unit name '.service': it must not start with '.'"),
])
def test_bad_unit_names(trusted_tmp_path, name, expected):
    quoted = '"' + name.replace("\\", "\\\\") + '"'
    error = one_error(trusted_tmp_path, f'[units.{quoted}]\negress = "tcp"\n')
    assert error.startswith("p.toml:1: units.")
    assert error.endswith(": " + expected)


@pytest.mark.parametrize("name", ["getty@tty1.service", "app-*.scope", "user-[0-9]*.slice", "x?.socket",
                                  "system-foo\\x2dbar.slice", "-.mount", "*"])
def test_good_unit_names(trusted_tmp_path, name):
    quoted = '"' + name.replace("\\", "\\\\") + '"'
    assert errors_of(trusted_tmp_path, f'[units.{quoted}]\negress = "tcp"\n') == []


def test_expression_errors_name_direction_and_column(trusted_tmp_path):
    assert errors_of(trusted_tmp_path, """
        [units."nginx.service"]
        ingress = "tcp && dst_port && udp"
        egress = "dst_port == 70000"
    """) == [
        'p.toml:2: units."nginx.service".ingress: column 8: dst_port is a number; compare it, e.g. dst_port == 53',
        'p.toml:3: units."nginx.service".egress: column 13: 70000 is out of range for dst_port (0..65535)',
    ]


def test_expression_error_in_a_multiline_string_points_at_its_line(trusted_tmp_path):
    assert one_error(trusted_tmp_path, '''
        [units."a.service"]
        ingress = """
          tcp
          || udp && dst_port == 70000
        """
    ''') == 'p.toml:4: units."a.service".ingress: column 25: 70000 is out of range for dst_port (0..65535)'
    assert one_error(trusted_tmp_path, """
        [units."a.service"]
        egress = '''tcp &&
        udp && foo'''
    """) == "p.toml:3: units.\"a.service\".egress: column 8: unknown name 'foo'"


def test_a_valid_entry_is_checked_once(trusted_tmp_path, monkeypatch):
    """Both directions in one pass: checking them one at a time as well (which only serves the
    error messages) made a policy of 100 units cost 0.1 s more at every start."""
    from bpfwall.policy import schema

    calls = []
    monkeypatch.setattr(schema, "analyze_pair", lambda *texts: calls.append(texts) or analyze_pair(*texts))
    assert errors_of(trusted_tmp_path, """
        [units."a.service"]
        ingress = "tcp && dst_port == 80"
        egress = "udp"
    """) == []
    assert calls == [("tcp && dst_port == 80", "udp")]


def test_set_used_with_two_kinds_across_directions(trusted_tmp_path):
    assert one_error(trusted_tmp_path, """
        [units."a.service"]
        ingress = "dst_port in @s"
        egress = "daddr in @s"
        sets = { s = [] }
    """) == ('p.toml:3: units."a.service".egress: column 10: set @s is a number set on ingress but an '
             'address set on egress; one set cannot be both')


def test_params_must_have_values_and_be_used(trusted_tmp_path):
    assert errors_of(trusted_tmp_path, """
        [units."a.service"]
        ingress = "tcp && dst_port == $admin_port"
        egress = "udp && dst_port in {$dns, 5353}"
        params = { admin_prot = 1, dns = 53 }
    """) == [
        "p.toml:4: units.\"a.service\".params.admin_prot: unknown parameter $admin_prot: the expressions do not "
        "use it (they use: $admin_port, $dns); did you mean 'admin_port'?",
        'p.toml:4: units."a.service".params: $admin_port (used by ingress) has no value; add admin_port = NUMBER',
    ]
    assert one_error(trusted_tmp_path, '[units."a.service"]\ningress = "dst_port == $p"\n') == \
        'p.toml:1: units."a.service".params: $p (used by ingress) has no value; add params = { p = NUMBER }'


@pytest.mark.parametrize("value, expected", [
    ("-1", "param $p: -1 is out of range (0..18446744073709551615)"),
    ('"80"', "expected an integer (the value of $p), got a string"),
    ("true", "expected an integer (the value of $p), got a boolean"),
])
def test_param_values(trusted_tmp_path, value, expected):
    assert one_error(trusted_tmp_path, f'[units."a.service"]\ningress = "dst_port == $p"\nparams = {{ p = {value} }}\n') \
        == f'p.toml:3: units."a.service".params.p: {expected}'


def test_param_values_up_to_u64(trusted_tmp_path):
    file = write(trusted_tmp_path, "a.toml", '[units."a.service"]\ningress = "len <= $p"\nparams.p = 0x7fffffffffffffff\n')
    assert load_policy(files=[file]).entries[0].params == {"p": 2**63 - 1}


def test_sets_must_be_given_and_used(trusted_tmp_path):
    assert errors_of(trusted_tmp_path, """
        [units."a.service"]
        ingress = "saddr in @admins || dst_port in @ports"
        sets = { admin = ["10.0.0.1"] }
    """) == [
        "p.toml:3: units.\"a.service\".sets.admin: unknown set @admin: the expressions do not use it "
        "(they use: @admins, @ports); did you mean 'admins'?",
        'p.toml:3: units."a.service".sets: @admins (used by ingress) is not given; add admins = [...] '
        '(an empty list is allowed)',
        'p.toml:3: units."a.service".sets: @ports (used by ingress) is not given; add ports = [...] '
        '(an empty list is allowed)',
    ]


def test_set_elements_are_checked_one_by_one_with_their_line(trusted_tmp_path):
    assert errors_of(trusted_tmp_path, """
        [units."a.service"]
        ingress = "saddr in @admins || dst_port in @ports"

        [units."a.service".sets]
        admins = [
            "10.0.0.0/8",
            "10.0.0.1/8",
            "fd00::/8",
            false,
        ]
        ports = ["80", "90..80", 70000, "0x50"]
    """) == [
        'p.toml:7: units."a.service".sets.admins[1]: set @admins: 10.0.0.1/8 has host bits set; '
        'did you mean 10.0.0.0/8?',
        'p.toml:9: units."a.service".sets.admins[3]: expected a string or an integer, got a boolean',
        'p.toml:11: units."a.service".sets.ports[1]: set @ports: empty range 90..80',
    ]


def test_set_not_an_array(trusted_tmp_path):
    assert one_error(trusted_tmp_path, '[units."a.service"]\ningress = "saddr in @s"\nsets.s = "10.0.0.1"\n') == \
        'p.toml:3: units."a.service".sets.s: expected an array (the elements of @s), got a string'


def test_set_capacity_counts_distinct_keys(trusted_tmp_path):
    base = '[units."a.service"]\ningress = "dst_port in @p"\nset_capacity = 10\n'
    # 1..5 and 4..8 overlap: 8 keys, plus 8 again: still 8 → fits.
    assert errors_of(trusted_tmp_path, base + 'sets.p = ["1..5", "4..8", 8]\n') == []
    assert one_error(trusted_tmp_path, base + 'sets.p = ["1..5", "4..8", 9, 10, 11]\n') == \
        'p.toml:4: units."a.service".sets.p: @p holds 11 elements; set_capacity is 10'
    huge = '[units."a.service"]\ningress = "dst_port in @p"\nsets.p = ["0..4294967295"]\n'
    assert "holds 4294967296 elements" in one_error(trusted_tmp_path, huge)


def test_every_error_of_every_file_is_reported_in_line_order(trusted_tmp_path):
    a = write(trusted_tmp_path, "a.toml", """
        [units."a.service"]
        cgroup = "x.slice"
        ingress = "tcp &&"
        mode = "x"
    """)
    b = write(trusted_tmp_path, "b.toml", "[units\n")
    policy, errors = check_policy(files=[a, b])
    assert policy is None
    assert [e.split(": ")[0] for e in errors] == [f"{a}:2", f"{a}:3", f"{a}:4", f"{b}:1"]


def test_same_unit_twice_names_both_places(trusted_tmp_path):
    a = write(trusted_tmp_path, "a.toml", '# web\n[units."nginx.service"]\ningress = "tcp"\n')
    b = write(trusted_tmp_path, "b.toml", '[units."x.service"]\ningress = "tcp"\n[units."nginx.service"]\negress = "udp"\n')
    assert check_policy(files=[a, b])[1] == [
        f'{b}:3: units."nginx.service": nginx.service is already defined at {a}:2']
    # Also when the second definition has errors of its own.
    c = write(trusted_tmp_path, "c.toml", '[units."nginx.service"]\nmode = 1\n')
    errors = check_policy(files=[a, c])[1]
    assert f'{c}:1: units."nginx.service": nginx.service is already defined at {a}:2' in errors


def test_not_utf8_and_unreadable(trusted_tmp_path):
    bad = trusted_tmp_path / "bad.toml"
    bad.write_bytes(b'[units."a.service"]\ningress = "\xff"\n')
    missing = str(trusted_tmp_path / "missing.toml")
    assert check_policy(files=[str(bad), missing])[1] == [
        f"{bad}:2: not UTF-8 text (byte 0xff)", f"{missing}: cannot open the policy file: No such file or directory"]


def test_load_policy_raises_the_first_error_with_all_of_them(trusted_tmp_path):
    file = write(trusted_tmp_path, "a.toml", '[units."a.service"]\ningress = 1\negress = 2\n')
    with pytest.raises(PolicyError) as info:
        load_policy(files=[file])
    assert isinstance(info.value, UserError)
    assert str(info.value) == (f'{file}:2: units."a.service".ingress: expected a string (a filter expression), '
                               "got an integer (and 1 more: bpfwall policy check lists them)")
    assert len(info.value.errors) == 2 and info.value.errors[1].startswith(f"{file}:3: ")


# -- the directory ------------------------------------------------------------

def test_directory_reads_toml_files_in_name_order(trusted_tmp_path):
    write(trusted_tmp_path, "20-b.toml", '[units."b.service"]\ningress = "tcp"\n')
    write(trusted_tmp_path, "10-a.toml", '[units."a.service"]\ningress = "tcp"\n')
    write(trusted_tmp_path, "30-c.toml.bak", "not toml at all [")
    write(trusted_tmp_path, ".#10-a.toml", "an editor's lock file [")
    (trusted_tmp_path / "sub.toml").mkdir()
    assert [os.path.basename(f) for f in policy_files(str(trusted_tmp_path))] == ["10-a.toml", "20-b.toml"]
    assert [e.name for e in load_policy(str(trusted_tmp_path)).entries] == ["a.service", "b.service"]


def test_directory_from_the_environment(trusted_tmp_path, monkeypatch):
    write(trusted_tmp_path, "a.toml", '[units."a.service"]\ningress = "tcp"\n')
    monkeypatch.setenv("BPFWALL_POLICY_DIR", str(trusted_tmp_path))
    assert [e.name for e in load_policy().entries] == ["a.service"]


def test_missing_directory(trusted_tmp_path):
    missing = str(trusted_tmp_path / "nope")
    assert check_policy(missing) == (None, [
        f"{missing}: cannot open the policy directory {missing}: No such file or directory"])
    with pytest.raises(PolicyError):
        load_policy(missing)


# -- only files nobody else can write -----------------------------------------
# (the same attacks run by an unprivileged user, and through the watcher: tests/kernel/test_policy_trust.py)

GOOD_UNIT = '[units."a.service"]\ningress = "tcp"\n'


def test_world_writable_file_is_refused_with_the_fix(trusted_tmp_path):
    file = write(trusted_tmp_path, "a.toml", GOOD_UNIT)
    os.chmod(file, 0o666)
    expected = (f"{file}: refused: the policy file is writable by group and others (mode 0666); "
                f"fix: chmod go-w {file}")
    assert check_policy(str(trusted_tmp_path)) == (None, [expected])
    assert check_policy(files=[file]) == (None, [expected])
    os.chmod(file, 0o620)
    assert "writable by group (mode 0620)" in check_policy(files=[file])[1][0]
    os.chmod(file, 0o644)
    assert check_policy(files=[file])[1] == []


def test_symlinked_file_is_refused_even_to_a_good_file(trusted_tmp_path):
    good = write(trusted_tmp_path, "real.toml.txt", GOOD_UNIT)
    os.symlink(good, trusted_tmp_path / "a.toml")
    link = str(trusted_tmp_path / "a.toml")
    [error] = check_policy(str(trusted_tmp_path))[1]
    assert error == (f"{link}: refused: the policy file is a symbolic link (to {good}), which lets whoever "
                     "owns the target change it; fix: replace it with a root-owned copy you have "
                     f"checked: cp --remove-destination {good} {link}")
    assert check_policy(files=[link])[1] == [error]


def test_policy_under_a_shared_directory_is_refused(tmp_path):
    # pytest's tmp_path is under /tmp (1777): anyone may create names there, so no policy is read from it.
    write(tmp_path, "a.toml", GOOD_UNIT)
    [error] = check_policy(str(tmp_path))[1]
    assert error == (f"{tmp_path}: refused: /tmp, a directory above it, is writable by group and others "
                     "(mode 1777, shared like /tmp); fix: keep policy files where only root can write, "
                     "e.g. in /etc/bpfwall")
    assert check_policy(files=[str(tmp_path / "a.toml")])[1] == [error.replace(str(tmp_path), f"{tmp_path}/a.toml", 1)]
    with pytest.raises(PolicyError, match="refused"):
        load_policy(str(tmp_path))


def test_writable_policy_directory_and_directories_above_it(trusted_tmp_path):
    policy = trusted_tmp_path / "policy"
    policy.mkdir()
    write(policy, "a.toml", GOOD_UNIT)
    os.chmod(policy, 0o775)
    assert check_policy(str(policy))[1] == [
        f"{policy}: refused: the policy directory {policy} is writable by group (mode 0775); "
        f"fix: chmod go-w {policy}"]
    os.chmod(policy, 0o755)
    os.chmod(trusted_tmp_path, 0o757)
    assert check_policy(str(policy))[1] == [
        f"{policy}: refused: {trusted_tmp_path}, a directory above it, is writable by others (mode 0757); "
        f"fix: chmod go-w {trusted_tmp_path}, or keep policy files where only root can write, e.g. in /etc/bpfwall"]
    os.chmod(trusted_tmp_path, 0o700)
    assert [e.name for e in load_policy(str(policy)).entries] == ["a.service"]


def test_symlinked_policy_directory_is_refused_a_link_above_it_is_followed(trusted_tmp_path):
    real = trusted_tmp_path / "real"
    (real / "policy").mkdir(parents=True)
    write(real / "policy", "a.toml", GOOD_UNIT)
    os.symlink(real / "policy", trusted_tmp_path / "policy")
    os.symlink(real, trusted_tmp_path / "above")
    link = trusted_tmp_path / "policy"
    assert check_policy(str(link))[1] == [
        f"{link}: refused: the policy directory {link} is a symbolic link (to {real}/policy); "
        f"fix: name the directory itself (--policy-dir {real}/policy or BPFWALL_POLICY_DIR={real}/policy)"]
    # A link above the policy directory (like /var/run -> /run) leads to directories that are checked.
    via = trusted_tmp_path / "above" / "policy"
    assert [e.file for e in load_policy(str(via)).entries] == [f"{via}/a.toml"]
    assert load_policy(files=[f"{link}/a.toml"]).entries[0].file == f"{link}/a.toml"  # a file's directory may be a link


def test_relative_policy_directory(trusted_tmp_path, monkeypatch):
    write(trusted_tmp_path, "a.toml", GOOD_UNIT)
    monkeypatch.chdir(trusted_tmp_path)
    assert [e.file for e in load_policy(".").entries] == ["./a.toml"]
    assert [e.file for e in load_policy(files=["a.toml"]).entries] == ["a.toml"]


def test_a_fifo_named_toml_is_refused_without_blocking(trusted_tmp_path):
    os.mkfifo(trusted_tmp_path / "a.toml")
    assert check_policy(str(trusted_tmp_path))[1] == [
        f"{trusted_tmp_path}/a.toml: refused: the policy file is not a regular file; fix: replace it with a regular file"]


def test_a_file_name_with_a_newline_stays_on_one_line(trusted_tmp_path):
    file = write(trusted_tmp_path, "a\nb.toml", GOOD_UNIT)
    os.chmod(file, 0o666)
    [error] = check_policy(str(trusted_tmp_path))[1]
    assert "\n" not in error and error.startswith(f"{trusted_tmp_path}/a\\nb.toml: refused: ")


def test_toml_nested_10000_deep_is_one_error(trusted_tmp_path):
    for text in ("a = " + "[" * 10000 + "]" * 10000,
                 "a = " + "{b = " * 10000 + "1" + "}" * 10000,
                 # deep enough for the key scanner that runs after tomllib accepted the document
                 '[units."a.service"]\ningress = "tcp"\nsets = { x = ' + "[" * 400 + "]" * 400 + " }\n"):
        file = write(trusted_tmp_path, "deep.toml", text)
        assert check_policy(files=[file]) == (None, [
            f"{file}: arrays or inline tables nested too deeply to read (a policy needs two levels at most)"])


# -- fingerprints -------------------------------------------------------------

FINGERPRINTED = """
[units."a.service"]
ingress = "tcp && dst_port == $p || saddr in @s"
params = { p = 1 }
sets = { s = ["10.0.0.0/8", "fd00::/8"] }
"""


def fingerprint(trusted_tmp_path, text: str) -> str:
    return load_policy(files=[write(trusted_tmp_path, "f.toml", text)]).entries[0].fingerprint()


def test_fingerprint_ignores_spelling(trusted_tmp_path):
    base = fingerprint(trusted_tmp_path, FINGERPRINTED)
    assert base == fingerprint(trusted_tmp_path, FINGERPRINTED.replace("tcp && dst_port", "tcp and  dst_port"))
    assert base == fingerprint(trusted_tmp_path, FINGERPRINTED.replace('"10.0.0.0/8", "fd00::/8"', '"fd00::/8", "10.0.0.0/8"'))
    assert base == fingerprint(trusted_tmp_path, FINGERPRINTED + 'cgroup = "system.slice/*"\n')
    assert base == fingerprint(trusted_tmp_path, "\n\n# moved down\n" + FINGERPRINTED)
    assert len(base) == 64 and base == fingerprint(trusted_tmp_path, FINGERPRINTED)


@pytest.mark.parametrize("change", [
    lambda t: t.replace("p = 1", "p = 2"),
    lambda t: t.replace('"fd00::/8"', '"fd00::/9"'),
    lambda t: t.replace("tcp &&", "udp &&"),
    lambda t: t + 'egress = "true"\n',
    lambda t: t + 'mode = "audit"\n',
    lambda t: t + 'backend = "nft"\n',
    lambda t: t + "set_capacity = 10\n",
])
def test_fingerprint_changes_with_the_filter(trusted_tmp_path, change):
    assert fingerprint(trusted_tmp_path, FINGERPRINTED) != fingerprint(trusted_tmp_path, change(FINGERPRINTED))


# -- the locator --------------------------------------------------------------

def test_locator_finds_tables_dotted_keys_and_inline_tables():
    text = textwrap.dedent('''
        # comment with [brackets] and "quotes"
        units."top.service".egress = "x # not a comment"
        [defaults]
        mode = "audit"   # trailing [comment]
        [units."a.service"]
        ingress = """
        multi [line] = "not a key"
        """
        params = { p = 1, "q.r" = { s = 2 } }
        sets.s = [
          "10.0.0.0/8",  # one
          'b',
        ]
        [units.'lit.service'  .  params]
        'x' = 1
        [[arrays]]
        k = 1
        [[arrays]]
        k = 2
    ''')
    tomllib.loads(text)  # valid TOML
    lines = key_lines(text)
    expect = {
        ("units", "top.service", "egress"): 3, ("units", "top.service"): 3, ("defaults",): 4,
        ("defaults", "mode"): 5, ("units", "a.service"): 6, ("units", "a.service", "ingress"): 7,
        ("units", "a.service", "params"): 10, ("units", "a.service", "params", "p"): 10,
        ("units", "a.service", "params", "q.r", "s"): 10, ("units", "a.service", "sets", "s"): 11,
        ("units", "a.service", "sets", "s", 0): 12, ("units", "a.service", "sets", "s", 1): 13,
        ("units", "lit.service", "params"): 15, ("units", "lit.service", "params", "x"): 16,
        ("arrays", 0, "k"): 18, ("arrays", 1, "k"): 20,
    }
    for path, line in expect.items():
        assert lines.get(path) == line, path
    assert line_of(lines, ("units", "a.service", "params", "missing")) == 10
    assert line_of(lines, ("nothing",)) == 1


def test_locator_handles_escapes_in_keys_and_strings():
    text = '"a\\"b\\u00e9" = "x\\\\"\n"c" = """a\\"""b"""\nd = 1\n'
    assert set(tomllib.loads(text)) == {'a"bé', "c", "d"}
    assert key_lines(text) == {('a"bé',): 1, ("c",): 2, ("d",): 3}


# Generated documents: each unit written in one of the styles TOML allows, with blank
# lines and comments between; the locator must find every key where it was written.
_KEY = st.sampled_from(["a.service", "b c.service", 'q"uote.scope', "x-y_z.slice", "dot.ted.mount"])
_STRING = st.text(alphabet='ab #[]{}="\\\n,.\'', max_size=12)


def _toml_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _toml_key(s: str) -> str:
    return s if s.replace("-", "").replace("_", "").isalnum() else _toml_string(s)


@st.composite
def documents(draw):
    lines: list[str] = []
    expect: dict[tuple, int] = {}
    names = draw(st.lists(_KEY, unique=True, max_size=4))
    style = draw(st.sampled_from(["tables", "dotted", "inline"]))
    if style == "inline" and names:
        lines.append("[units]")
    for name in names:
        for _ in range(draw(st.integers(0, 2))):
            lines.append(draw(st.sampled_from(["", "# a comment = [x]", "   "])))
        values = draw(st.dictionaries(st.sampled_from(["ingress", "egress", "mode"]), _STRING, min_size=1))
        if style == "tables":
            lines.append(f"[units.{_toml_key(name)}]")
            expect[("units", name)] = len(lines)
            for key, value in values.items():
                lines.append(f"{key} = {_toml_string(value)}")
                expect[("units", name, key)] = len(lines)
            elements = draw(st.lists(_STRING, max_size=3))
            lines.append("sets.s = [")
            expect[("units", name, "sets", "s")] = len(lines)
            for i, element in enumerate(elements):
                lines.append(f"  {_toml_string(element)},  # [{i}]")
                expect[("units", name, "sets", "s", i)] = len(lines)
            lines.append("]")
        elif style == "dotted":
            for key, value in values.items():
                lines.append(f"units . {_toml_key(name)}.{key} = {_toml_string(value)}")
                expect.setdefault(("units", name), len(lines))
                expect[("units", name, key)] = len(lines)
        else:
            pairs = ", ".join(f"{k} = {_toml_string(v)}" for k, v in values.items())
            lines.append(f"{_toml_key(name)} = {{ {pairs} }}")
            expect[("units", name)] = len(lines)
            for key in values:
                expect[("units", name, key)] = len(lines)
    return "\n".join(lines) + "\n", expect


@settings(max_examples=300)
@given(documents())
def test_locator_on_generated_documents(doc):
    text, expect = doc
    tomllib.loads(text)
    lines = key_lines(text)
    for path, line in expect.items():
        assert lines.get(path) == line, (path, text)


def test_entries_are_hashable_and_compare_by_value(trusted_tmp_path):
    file = write(trusted_tmp_path, "a.toml", FINGERPRINTED)
    first, second = load_policy(files=[file]).entries[0], load_policy(files=[file]).entries[0]
    assert first == second and hash(first) == hash(second) and len({first, second}) == 1


@pytest.mark.parametrize("text, expected", [
    ('[units."a.service"]\ningress = "tcp"\n\n[units."a.service"]\negress = "udp"\n',
     'p.toml:4: units."a.service": defined twice (first at line 1)'),
    ('[units]\n"a.service" = { ingress = "tcp" }\n"a.service" = { egress = "udp" }\n',
     'p.toml:3: units."a.service": defined twice (first at line 2)'),
    ('[units."a.service"]\ningress = "tcp"\ningress = "udp"\n',
     'p.toml:3: units."a.service".ingress: defined twice (first at line 2)'),
    ('units."a.service".ingress = "tcp"\n[units."a.service"]\negress = "udp"\n',
     'p.toml:2: units."a.service": defined twice (first at line 1)'),
    ('[units."a.service"]\ningress = "tcp"\n[units]\n"a.service".egress = "udp"\n',
     'p.toml:4: units."a.service": defined twice (first at line 1)'),
])
def test_same_unit_twice_in_one_file(trusted_tmp_path, text, expected):
    assert one_error(trusted_tmp_path, text) == expected


def test_log_limit_from_defaults_and_unit(trusted_tmp_path):
    file = write(trusted_tmp_path, "p.toml", """
        [defaults]
        log_rate = 10
        [units."a.service"]
        ingress = "tcp"
        log_burst = 30
        [units."b.service"]
        ingress = "tcp"
        log_rate = 0
    """)
    policy, errors = check_policy(files=[file])
    assert errors == []
    assert policy.entry("a.service").log == {"log_rate": 10, "log_burst": 30}
    assert policy.entry("b.service").log == {"log_rate": 0}


def test_log_limit_errors(trusted_tmp_path):
    base = '[units."a.service"]\ningress = "tcp"\n'
    assert one_error(trusted_tmp_path, base + "log_rate = -1\n") == \
        'p.toml:3: units."a.service".log_rate: -1 is out of range (0..1000000; log_rate = 0 turns drop events off)'
    assert one_error(trusted_tmp_path, base + 'log_burst = "5"\n') == \
        'p.toml:3: units."a.service".log_burst: expected an integer (drop events per second / at once), got a string'


def test_log_limit_changes_the_fingerprint_only_when_written(trusted_tmp_path):
    def entry(extra: str):
        policy, errors = check_policy(files=[write(trusted_tmp_path, "p.toml", '[units."a.service"]\ningress = "tcp"\n' + extra)])
        return policy.entry("a.service")
    plain, limited = entry(""), entry("log_rate = 5\n")
    assert "log" not in plain.filter_spec() and plain.log == {}
    assert plain.fingerprint() != limited.fingerprint() != entry("log_rate = 6\n").fingerprint()


def test_strict_only_on_slice_defaults(trusted_tmp_path):
    file = write(trusted_tmp_path, "p.toml", """
        [units."system.slice"]
        egress = "false"
        strict = true
        [units."user-*.slice"]
        egress = "false"
        strict = false
        [units."a.service"]
        egress = "tcp"
    """)
    policy, errors = check_policy(files=[file])
    assert errors == []
    assert [(e.name, e.is_slice_default, e.strict) for e in policy.entries] == [
        ("system.slice", True, True), ("user-*.slice", True, False), ("a.service", False, False)]
    assert policy.entry("system.slice").filter_spec()["strict"] is True
    assert "strict" not in policy.entry("user-*.slice").filter_spec()  # fingerprints of old entries stay
    assert policy.entry("system.slice").as_dict()["strict"] is True
    for name in ("a.service", "*", "app-*.scope"):
        assert one_error(trusted_tmp_path, f'[units."{name}"]\negress = "tcp"\nstrict = true\n') == (
            f'p.toml:3: units."{name}".strict: strict = true is only for slice defaults (an entry whose name '
            f'ends in .slice, e.g. [units."system.slice"]); {name} names units, not slices')
    assert one_error(trusted_tmp_path, '[units."a.slice"]\negress = "tcp"\nstrict = 1\n') == \
        'p.toml:3: units."a.slice".strict: expected true or false, got an integer'
    assert one_error(trusted_tmp_path, '[defaults]\nstrict = true\n').startswith("p.toml:2: defaults.strict: unknown key")


def test_show_keeps_set_elements_in_the_order_written(trusted_tmp_path):
    """`policy show` printed `{10..12, 22, 443, 80, 8080}` (sorted as strings) for what the
    file says as `["8080", "443", "80", "22", "10..12"]`; the fingerprint ignores the order."""
    first = write(trusted_tmp_path, "a.toml", """
        [units."web.service"]
        ingress = "tcp && local_port in @web"
        sets = { web = ["8080", "443", "80", "22", "10..12", "443"] }
        """)
    entry = load_policy(files=[first]).entries[0]
    assert entry.sets_as_written() == {"web": ["8080", "443", "80", "22", "10..12"]}
    assert entry.as_dict()["sets"] == {"web": ["8080", "443", "80", "22", "10..12"]}
    other = write(trusted_tmp_path, "b.toml", """
        [units."web.service"]
        ingress = "tcp && local_port in @web"
        sets = { web = ["10..12", "22", "80", "443", "8080"] }
        """)
    assert load_policy(files=[other]).entries[0].fingerprint() == entry.fingerprint()
