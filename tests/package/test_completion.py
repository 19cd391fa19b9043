"""Tab completion as bash does it: the package's completion file (register-python-argcomplete's
hook) is sourced, COMP_WORDS/COMP_LINE are set as readline sets them, and the hook runs this
tree's bpfwall, whose argcomplete completers read the pins."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.kernel.invoke import bpfwall

pytestmark = pytest.mark.package

VENV_BIN = str(Path(__file__).resolve().parents[2] / ".venv" / "bin")
NOBODY = 65534
DRIVER = r"""
line="$1"
COMP_LINE="$line"; COMP_POINT=${#line}; COMP_TYPE=9
read -ra COMP_WORDS <<< "$line"
[[ "$line" == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
_python_argcomplete bpfwall
printf '%s\n' "${COMPREPLY[@]}"
"""


@pytest.fixture(scope="module")
def hook(built_deb, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("completion")
    subprocess.run(["dpkg-deb", "-x", str(built_deb), str(out)], check=True)
    return out / "usr/share/bash-completion/completions/bpfwall"


def complete(hook: Path, line: str, env: dict | None = None, user: int | None = None) -> list[str]:
    prefix = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] if user is not None else []
    # The hook's text inline (not sourced by path: pytest's temporary directories are root's, 0700).
    proc = subprocess.run([*prefix, "bash", "-c", hook.read_text() + DRIVER, "drive", line], capture_output=True, text=True,
                          timeout=60, env={"PATH": f"{VENV_BIN}:/usr/bin:/bin", "HOME": "/", **(env or {})})
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    return [w.strip() for w in proc.stdout.splitlines() if w.strip()]


def test_commands_options_and_choices(hook):
    assert complete(hook, "bpfwall un") == ["unload"]
    assert complete(hook, "bpfwall lo") == ["load"]
    assert set(complete(hook, "bpfwall policy ")) == {"check", "show", "match"}
    assert complete(hook, "bpfwall load web.service --in") == ["--ingress"]
    assert complete(hook, "bpfwall --backend ") == ["bpf", "nft"]
    assert complete(hook, "bpfwall path x ") == ["ingress", "egress"]


@pytest.mark.kernel
def test_loaded_units_and_a_units_params_and_sets(hook, pin_root):
    r = bpfwall("load", "web.service", "--ingress", "tcp && local_port == $port", "--param", "port=80",
                "--egress", "udp && remote_addr in @dns")
    assert r.returncode == 0, r.stderr
    assert bpfwall("load", "db.service", "--ingress", "icmp").returncode == 0
    env = {"BPFWALL_PIN_ROOT": pin_root}
    assert complete(hook, "bpfwall stats ", env) == ["db.service", "web.service"]
    assert complete(hook, "bpfwall unload w", env) == ["web.service"]
    assert set(complete(hook, "bpfwall set web.service ", env)) == {
        "port=", "@dns+", "@dns-", "@dns=", "mode=enforce", "mode=audit", "log_rate=", "log_burst="}
    assert complete(hook, "bpfwall set web.service @", env) == ["@dns+", "@dns-", "@dns="]


@pytest.mark.kernel
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody")
def test_not_root_gets_what_needs_no_pins_and_no_error(hook, pin_root):
    assert bpfwall("load", "web.service", "--ingress", "tcp && local_port == $port").returncode == 0
    env = {"BPFWALL_PIN_ROOT": pin_root}
    assert complete(hook, "bpfwall stats ", env, user=NOBODY) == []  # bpffs is root's: nothing to offer
    assert set(complete(hook, "bpfwall set web.service ", env, user=NOBODY)) == {
        "mode=enforce", "mode=audit", "log_rate=", "log_burst="}
    assert complete(hook, "bpfwall un", env, user=NOBODY) == ["unload"]
