"""Drop-ins, loader instance names and `bpfwall dropin`/`apply`/`run` input checks (no root needed)."""
from __future__ import annotations

import configparser
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from bpfwall import dropin, run
from bpfwall.backends import bpf
from bpfwall.cli import main

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "units" / "examples"

POLICY = """
[units."web.service"]
ingress = "tcp && local_port == 80"

[units."both.socket"]
ingress = "tcp"
egress = "udp"

[units."out-*.service"]
egress = "udp && remote_port == 53"

[units."nft.service"]
backend = "nft"
ingress = "tcp"

[units."a-b.service"]
egress = "udp"

[units."app-*.scope"]
cgroup = "user@*.service/app.slice/*"
egress = "udp"
"""


def _parse(text: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=True, interpolation=None)
    cp.optionxform = str  # systemd keys are case-sensitive
    cp.read_string(text)
    return cp


@pytest.fixture
def policy_dir(trusted_tmp_path):
    d = trusted_tmp_path / "policy"
    d.mkdir()
    (d / "10-test.toml").write_text(POLICY)
    return d


@pytest.fixture
def unit_dir(tmp_path):
    return tmp_path / "system"


def _cli(capsys, *args) -> tuple[int, str, str]:
    try:
        rc = main(list(args))
    except SystemExit as e:  # `run` exits with the command's status
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


# -- names and sections ------------------------------------------------------

@pytest.mark.parametrize("unit, loader", [
    ("nginx.service", "bpfwall@nginx.service.service"),
    ("getty@tty1.service", "bpfwall@getty@tty1.service.service"),
    ("foo-bar.socket", "bpfwall@foo-bar.socket.service"),
    ("system-x\\x2dy.slice", "bpfwall@system-x\\x2dy.slice.service"),
])
def test_loader_instance_is_the_unit_name_verbatim(unit, loader):
    assert dropin.loader_unit(unit) == loader


@pytest.mark.parametrize("unit, section", [
    ("a.service", "Service"), ("a.socket", "Socket"), ("a.mount", "Mount"), ("a.swap", "Swap"),
    ("a.slice", "Slice"), ("a.scope", "Scope"),
])
def test_section_is_the_unit_types_own(unit, section):
    assert dropin.section(unit) == section


@pytest.mark.parametrize("unit, words", [
    ("multi-user.target", "a .target unit has no IPIngressFilterPath="),
    ("x.timer", "a .timer unit has no"),
    ("nginx", "needs a type suffix"),
    ("nginx.conf", "needs a type suffix"),
    ("foo@.service", "is a template"),
    ("bpfwall@nginx.service.service", "bpfwall's own unit"),
    ("bpfwall.service", "bpfwall's own unit"),
    ("system.slice", "contains the loader units"),
    ("-.slice", "contains the loader units"),
    ("ngi/nx.service", "character '/'"),
    ("app-*.scope", "character '*'"),
    ("x" * 240 + ".service", "characters"),
])
def test_units_that_cannot_have_a_dropin(unit, words):
    with pytest.raises(dropin.DropinError) as info:
        dropin.section(unit)
    assert words in str(info.value)


def test_parse_directions():
    assert dropin.parse_directions("egress,ingress") == ("ingress", "egress")
    assert dropin.parse_directions(" egress ") == ("egress",)
    for bad in ("", "in", "ingress,out", ","):
        with pytest.raises(dropin.DropinError, match="--directions"):
            dropin.parse_directions(bad)


# -- the text ------------------------------------------------------------------

def test_render_requires_orders_and_names_the_pins():
    text = dropin.render("db.socket", {"egress": "/sys/fs/bpf/bpfwall/db+socket/egress"})
    cp = _parse(text)
    assert cp["Unit"]["Requires"] == "bpfwall@db.socket.service"
    assert cp["Unit"]["After"] == "bpfwall@db.socket.service"
    assert dict(cp["Socket"]) == {"IPEgressFilterPath": "/sys/fs/bpf/bpfwall/db+socket/egress"}
    assert "%" not in text


def test_render_needs_a_direction():
    with pytest.raises(dropin.DropinError, match="no direction"):
        dropin.render("a.service", {})


# Each is a line break to systemd (\r, NUL), a control character, a C1 control (NEL), a
# Unicode line/paragraph separator, a bidi override, or an undecodable argv byte.
UNWRITABLE = [("\r", "U+000D"), ("\n", "U+000A"), ("\0", "U+0000"), ("\t", "U+0009"), ("\x0b", "U+000B"),
              ("\x7f", "U+007F"), ("\x85", "U+0085"), ("\u2028", "U+2028"), ("\u2029", "U+2029"),
              ("\u202e", "U+202E"), ("\udcff", "0xff")]


@pytest.mark.parametrize("ch, code", UNWRITABLE)
def test_render_refuses_every_character_a_unit_file_cannot_hold(ch, code):
    path = f"/sys/fs/bpf/x{ch}ExecStartPre=/bin/touch /tmp/bpfwall-test-pwned/a+service/ingress"
    with pytest.raises(dropin.DropinError) as info:
        dropin.render("a.service", {"ingress": path})
    message = str(info.value)
    assert "\n" not in message and repr(path) in message and f"({code})" in message
    with pytest.raises(dropin.DropinError) as info:
        dropin.render_loader_env({"BPFWALL_POLICY_DIR": f"/etc/x{ch}y"})
    assert str(info.value).startswith("BPFWALL_POLICY_DIR ") and f"({code})" in str(info.value)


@pytest.mark.parametrize("path, words", [
    ("/sys/fs/bpf/x /a+service/ingress ", "begins or ends with a space"),
    (" /sys/fs/bpf/a+service/ingress", "begins or ends with a space"),
    ("sys/fs/bpf/a+service/ingress", "is not absolute"),
    ("/sys/fs/bpf/../a+service/ingress", "'..' component"),
    ("/sys/fs/bpf/a+service/ingress\\", "ends with a backslash"),
])
def test_render_refuses_paths_systemd_would_read_differently(path, words):
    with pytest.raises(dropin.DropinError, match=words):
        dropin.render("a.service", {"ingress": path})


def test_transient_paths_refuse_percent_which_systemd_writes_unescaped():
    dropin.check_filter_path("/sys/fs/bpf/50%/a")  # a drop-in escapes it
    with pytest.raises(dropin.DropinError, match="contains '%'"):
        dropin.check_filter_path("/sys/fs/bpf/50%/a", transient=True)


def test_example_dropin_is_what_bpfwall_writes(capsys):
    """units/examples/nginx.service.d/bpfwall.conf cannot drift from the generator."""
    expected = (EXAMPLES / "nginx.service.d" / "bpfwall.conf").read_text()
    paths = {d: bpf.prog_path(bpf.DEFAULT_PIN_ROOT, "nginx.service", d) for d in bpf.DIRECTIONS}
    assert dropin.render("nginx.service", paths) == expected


def test_example_service_names_the_pins_bpfwall_path_prints(capsys):
    cp = _parse((EXAMPLES / "nginx.service").read_text())
    for d, key in dropin.SETTINGS.items():
        rc, out, _ = _cli(capsys, "path", "nginx.service", d, "--pin-root", bpf.DEFAULT_PIN_ROOT)
        assert rc == 0 and cp["Service"][key] == out.strip()
    assert "bpfwall@nginx.service.service" in cp["Unit"]["Requires"].split()
    assert "bpfwall@nginx.service.service" in cp["Unit"]["After"].split()


def test_loader_template_passes_the_instance_unescaped():
    cp = _parse((REPO / "units" / "bpfwall@.service").read_text())
    svc = cp["Service"]
    assert svc["ExecStart"].split()[1:] == ["apply", "%i"]
    assert svc["ExecStop"].split()[1:] == ["unload", "%i"]
    assert (svc["Type"], svc["RemainAfterExit"]) == ("oneshot", "yes")
    assert cp["Unit"]["DefaultDependencies"] == "no"


# -- write / remove ----------------------------------------------------------------

def test_write_is_atomic_and_idempotent(tmp_path):
    path = str(tmp_path / "x.service.d" / "bpfwall.conf")
    assert dropin.write(path, "one\n") is True
    assert dropin.write(path, "one\n") is False
    assert dropin.write(path, "two\n") is True
    assert Path(path).read_text() == "two\n"
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert sorted(os.listdir(tmp_path / "x.service.d")) == ["bpfwall.conf"]  # no temporaries left


def test_remove_keeps_other_dropins(tmp_path):
    d = tmp_path / "x.service.d"
    d.mkdir()
    (d / "bpfwall.conf").write_text("x")
    (d / "local.conf").write_text("y")
    assert dropin.remove(str(d / "bpfwall.conf")) is True
    assert sorted(os.listdir(d)) == ["local.conf"]
    assert dropin.remove(str(d / "bpfwall.conf")) is False


# -- the command ----------------------------------------------------------------------

def _install_template(unit_dir):
    unit_dir.mkdir(parents=True, exist_ok=True)
    (unit_dir / dropin.TEMPLATE).write_text("[Service]\nType=oneshot\nExecStart=/bin/true %i\n")


def test_dropin_from_policy_writes_and_removes(capsys, policy_dir, unit_dir):
    _install_template(unit_dir)
    rc, out, err = _cli(capsys, "dropin", "both.socket", "--unit-dir", str(unit_dir),
                        "--policy-dir", str(policy_dir), "--pin-root", "/sys/fs/bpf/t1", "--no-reload")
    assert rc == 0, err
    cp = _parse((unit_dir / "both.socket.d" / "bpfwall.conf").read_text())
    assert dict(cp["Socket"]) == {"IPIngressFilterPath": "/sys/fs/bpf/t1/both+socket/ingress",
                                  "IPEgressFilterPath": "/sys/fs/bpf/t1/both+socket/egress"}
    # A non-default pin root and policy reach the loader instance through its own drop-in.
    text = (unit_dir / "bpfwall@both.socket.service.d" / "bpfwall.conf").read_text()
    assert 'Environment="BPFWALL_PIN_ROOT=/sys/fs/bpf/t1"' in text
    assert f'Environment="BPFWALL_POLICY_DIR={policy_dir}"' in text
    assert "daemon-reload" in out

    rc, out, err = _cli(capsys, "dropin", "both.socket", "--unit-dir", str(unit_dir), "--remove", "--no-reload")
    assert rc == 0, err
    assert not (unit_dir / "both.socket.d").exists()
    assert not (unit_dir / "bpfwall@both.socket.service.d").exists()
    rc, out, _ = _cli(capsys, "dropin", "both.socket", "--unit-dir", str(unit_dir), "--remove")
    assert rc == 0 and "no bpfwall drop-in" in out


def test_dropin_directions_follow_the_entry_glob_included(capsys, policy_dir, unit_dir):
    rc, out, err = _cli(capsys, "dropin", "out-1.service", "--dry-run", "--unit-dir", str(unit_dir),
                        "--policy-dir", str(policy_dir), "--pin-root", bpf.DEFAULT_PIN_ROOT)
    assert rc == 0, err
    assert "IPEgressFilterPath=/sys/fs/bpf/bpfwall/out-1+service/egress" in out
    assert "IPIngressFilterPath" not in out
    assert not unit_dir.exists()  # --dry-run writes nothing


def test_dropin_directions_option_needs_no_policy(capsys, tmp_path, unit_dir):
    rc, out, err = _cli(capsys, "dropin", "x.scope", "--directions", "ingress", "--dry-run",
                        "--policy-dir", str(tmp_path / "none"), "--pin-root", bpf.DEFAULT_PIN_ROOT)
    assert rc == 0, err
    cp = _parse(out.split("\n", 1)[1])
    assert dict(cp["Scope"]) == {"IPIngressFilterPath": "/sys/fs/bpf/bpfwall/x+scope/ingress"}


def test_dropin_refuses_a_carriage_return_in_the_pin_root(capsys, tmp_path, unit_dir):
    """systemd ends a line at \\r: this pin root put an ExecStartPre= into the drop-in."""
    marker = tmp_path / "pwned"
    pin_root = f"/sys/fs/bpf/x\rExecStartPre=/bin/touch {marker}"
    rc, out, err = _cli(capsys, "dropin", "x.service", "--directions", "ingress", "--pin-root", pin_root,
                        "--unit-dir", str(unit_dir), "--no-reload")
    assert rc == 2 and err.startswith("bpfwall: error: pin path ") and err.count("\n") == 1, err
    assert "control character (U+000D)" in err and repr(bpf.prog_path(pin_root, "x.service", "ingress")) in err
    assert not unit_dir.exists() and out == ""


@pytest.mark.parametrize("ch, code", UNWRITABLE)
def test_dropin_refuses_unwritable_policy_dirs_and_writes_nothing(capsys, tmp_path, unit_dir, ch, code):
    rc, _, err = _cli(capsys, "dropin", "x.service", "--directions", "egress", "--unit-dir", str(unit_dir),
                      "--policy-dir", f"{tmp_path}/p{ch}q", "--no-reload")
    assert rc == 2 and "BPFWALL_POLICY_DIR" in err and f"({code})" in err and err.count("\n") == 1, err
    assert not unit_dir.exists()  # not even the unit's own drop-in, rendered first


def test_run_refuses_a_pin_root_a_transient_unit_cannot_hold(tmp_path):
    from bpfwall import backends
    from bpfwall.build import UnitProgram
    from bpfwall.lang.checker import analyze

    program = UnitProgram(None, analyze("udp"))
    for pin_root in (f"{tmp_path}/a\rIPEgressFilterPath=", f"{tmp_path}/50%n"):
        with pytest.raises(dropin.DropinError, match="pin path"):
            run.run(["true"], program, backend=backends.create("bpf", pin_root=pin_root), systemd=True)
        assert not os.path.exists(pin_root)


# -- what systemd itself reads -------------------------------------------------------

def _systemd_reads(unit_file: Path) -> dict[str, list[str]]:
    """The unit as systemd 'systemd-analyze verify' parsed it (its debug dump): setting → values."""
    proc = subprocess.run(["systemd-analyze", "verify", str(unit_file)], capture_output=True, text=True,
                          env=dict(os.environ, SYSTEMD_LOG_LEVEL="debug", SYSTEMD_LOG_COLOR="0"))
    # Split on \n only: the values may hold what str.splitlines() would break at.
    lines = (proc.stdout + proc.stderr).split("\n")
    start = lines.index(f"\t-> Unit {unit_file.name}:")
    settings: dict[str, list[str]] = {}
    for line in lines[start + 1:]:
        if not line.startswith("\t\t"):
            break
        key, _, value = line.strip("\t").partition(": ")
        settings.setdefault(key, []).append(value)
    return settings


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_reads_back_exactly_what_was_asked(capsys, tmp_path, unit_dir):
    """'%', spaces, quotes, backslashes and '$' in the pin root and policy dir reach systemd intact."""
    pin_root = "/sys/fs/bpf/50% of it/a b\\c\"d'$HOME"
    policy = tmp_path / "policy %n \"q\" \\x $USER"
    _install_template(unit_dir)
    rc, _, err = _cli(capsys, "dropin", "a-b.service", "--directions", "ingress,egress", "--pin-root", pin_root,
                      "--policy-dir", str(policy), "--unit-dir", str(unit_dir), "--no-reload")
    assert rc == 0, err
    (unit_dir / "a-b.service").write_text("[Service]\nExecStart=/bin/true\n")

    unit = _systemd_reads(unit_dir / "a-b.service")
    assert unit["IPIngressFilterPath"] == [bpf.prog_path(pin_root, "a-b.service", "ingress")]
    assert unit["IPEgressFilterPath"] == [bpf.prog_path(pin_root, "a-b.service", "egress")]
    assert unit["Command Line"] == ["/bin/true"]
    loader = _systemd_reads(unit_dir / "bpfwall@a-b.service.service")
    assert sorted(loader["Environment"]) == [f"BPFWALL_PIN_ROOT={pin_root}", f"BPFWALL_POLICY_DIR={policy}"]
    assert loader["Command Line"] == ["/bin/true a-b.service"]


@pytest.mark.skipif(dropin.systemd_running() or any(
    os.path.exists(os.path.join(d, dropin.TEMPLATE)) for d in dropin.UNIT_SEARCH_PATH),
    reason="this host has bpfwall's template unit installed")
def test_dropin_without_the_template_unit_is_refused_unless_forced(capsys, unit_dir):
    # Requires=bpfwall@x.service.service on a host without the template: x.service cannot start.
    args = ("dropin", "x.service", "--directions", "ingress", "--unit-dir", str(unit_dir), "--no-reload")
    rc, out, err = _cli(capsys, *args)
    assert rc == 2 and err.count("\n") == 1, err
    assert "bpfwall@.service is not installed" in err and "--force" in err and "make install" in err
    assert not unit_dir.exists() and out == ""
    rc, out, err = _cli(capsys, *args, "--force")
    assert rc == 0, err
    assert (unit_dir / "x.service.d" / "bpfwall.conf").exists()
    _install_template(unit_dir / "elsewhere")  # one in the --unit-dir counts as installed
    rc, _, err = _cli(capsys, *args[:-3], "--unit-dir", str(unit_dir / "elsewhere"), "--no-reload")
    assert rc == 0, err


@pytest.mark.parametrize("args, words", [
    (["nope.service"], "no policy entry for nope.service in"),
    (["nft.service"], "uses the nft backend"),
    (["bad/name.service"], "character '/'"),
    (["x.target", "--directions", "ingress"], "a .target unit has no"),
    (["x.service", "--directions", "sideways"], "--directions"),
])
def test_dropin_errors_change_nothing(capsys, policy_dir, unit_dir, args, words):
    rc, out, err = _cli(capsys, "dropin", *args, "--unit-dir", str(unit_dir), "--policy-dir", str(policy_dir))
    assert rc == 2 and err.startswith("bpfwall: error: ") and words in err, err
    assert not unit_dir.exists()


def test_dropin_with_a_broken_policy_names_file_and_line(capsys, policy_dir, unit_dir):
    (policy_dir / "20-bad.toml").write_text('[units."x.service"]\ningress = "dst_port && udp"\n')
    rc, _, err = _cli(capsys, "dropin", "web.service", "--unit-dir", str(unit_dir), "--policy-dir", str(policy_dir))
    assert rc == 2 and "20-bad.toml:2" in err
    assert not unit_dir.exists()


# -- apply and run: input errors come before anything is loaded ----------------------------

def test_apply_without_an_entry(capsys, policy_dir):
    rc, _, err = _cli(capsys, "apply", "nope.service", "--policy-dir", str(policy_dir))
    assert rc == 2 and f"no policy entry for nope.service in {policy_dir}" in err


def test_apply_explains_a_systemd_escaped_instance(capsys, policy_dir):
    rc, _, err = _cli(capsys, "apply", "a\\x2db.service", "--policy-dir", str(policy_dir))
    assert rc == 2
    assert "there is one for a-b.service" in err and "bpfwall@a-b.service.service" in err


def test_apply_names_entries_only_the_watcher_can_match(capsys, policy_dir):
    rc, _, err = _cli(capsys, "apply", "app-x.scope", "--policy-dir", str(policy_dir))
    assert rc == 2 and "no policy entry for app-x.scope" in err
    assert "only app-*.scope (" in err and "10-test.toml:" in err and "restricted by cgroup =" in err


def test_apply_refuses_the_nft_backend(capsys, policy_dir):
    rc, _, err = _cli(capsys, "apply", "nft.service", "--policy-dir", str(policy_dir))
    assert rc == 2 and "nft backend" in err and "bpfwall.service" in err


@pytest.mark.parametrize("name, unit", [(None, None), ("job", "job.scope"), ("job.scope", "job.scope")])
def test_run_scope_names(name, unit):
    got = run.scope_name(name)
    if unit is None:
        assert got.startswith("run-bpfwall-") and got.endswith(".scope") and got != run.scope_name(None)
    else:
        assert got == unit


@pytest.mark.parametrize("args, words", [
    (["--egress", "dst_port && udp", "--", "true"], "dst_port is a number"),
    (["--", "true"], "give --ingress EXPR, --egress EXPR or both"),
    (["--egress", "udp", "--name", "job.service", "--", "true"], "runs as a scope"),
    (["--egress", "udp", "--name", "a/b", "--", "true"], "character '/'"),
    (["--egress", "udp", "--", "no-such-command-bpfwall"], "no-such-command-bpfwall: command not found"),
    (["--egress", "udp && remote_port == $p", "--param", "q=1", "--", "true"], "$q"),
])
def test_run_input_errors(capsys, args, words, tmp_path):
    rc, out, err = _cli(capsys, "run", "--pin-root", str(tmp_path / "pins"), *args)
    assert rc == 2 and err.startswith("bpfwall: error: ") and words in err, err
    assert not (tmp_path / "pins").exists()
