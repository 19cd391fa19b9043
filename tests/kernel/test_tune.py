"""`bpfwall tune` in a real terminal (tmux, 80×24), on a unit loaded in the test's own pin root
and attached to its own cgroup: keys change the kernel's map values (read back through the
pins), the MTU example with real packets, a bad typed value, and the terminal restored on q,
Ctrl-C and a unit unloaded underneath."""
from __future__ import annotations

import re
import socket
import threading

import pytest

from bpfwall.backends import bpf
from tests.kernel.invoke import bpfwall
from tests.kernel.tune_pane import Pane

UNIT = "tune-demo.service"
MTU = 1000  # the IP length of the test's datagrams: they pass at $mtu = 1000, drop at 999


@pytest.fixture
def unit(pin_root, temp_cgroup):
    r = bpfwall("load", UNIT, "--egress", "len <= $mtu && !(udp && remote_port in @blocked)",
                "--param", f"mtu={MTU}", env={"BPFWALL_PIN_ROOT": pin_root})
    assert r.returncode == 0, r.stderr
    r = bpfwall("attach", UNIT, temp_cgroup.path, env={"BPFWALL_PIN_ROOT": pin_root})
    assert r.returncode == 0, r.stderr
    return UNIT


@pytest.fixture
def tune(pin_root, events_state_dir):
    panes = []

    def start(*args: str) -> Pane:
        pane = Pane({"BPFWALL_PIN_ROOT": pin_root, "BPFWALL_BACKEND": "bpf", "BPFWALL_STATE_DIR": str(events_state_dir)},
                    *args)
        panes.append(pane)
        return pane
    try:
        yield start
    finally:
        for p in panes:
            p.close()


def kernel_values(pin_root: str) -> tuple[dict, dict]:
    """The unit's params and sets as its pinned maps hold them (not tune's own state)."""
    with bpf.PinnedUnit.open(pin_root, UNIT) as u:
        return u.params(), {name: u.set_elements(name) for name in u.meta["sets"]}


def wait_param(pin_root, value: int, timeout=10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while kernel_values(pin_root)[0]["mtu"] != value:
        assert time.monotonic() < deadline, f"$mtu is {kernel_values(pin_root)[0]['mtu']}, not {value}"
        time.sleep(0.05)


def test_keys_change_the_pinned_maps(unit, pin_root, tune):
    pane = tune(unit)
    pane.wait_text(f"$mtu = {MTU}")
    pane.keys("-")
    wait_param(pin_root, MTU - 1)
    pane.keys("*")  # shift: ×10
    wait_param(pin_root, MTU + 9)
    pane.keys("s", "_")  # step 10, ×10 down
    wait_param(pin_root, MTU + 9 - 100)
    pane.wait_text(f"$mtu = {MTU - 91}")
    # `bpfwall stats` shows it at once
    assert f"$mtu = {MTU - 91}" in bpfwall("stats", UNIT, env={"BPFWALL_PIN_ROOT": pin_root}).stdout

    pane.keys("j", "a")  # the set's row: add elements
    pane.type("53,5353")
    pane.keys("Enter")
    pane.wait_text("@blocked: added 2")
    assert kernel_values(pin_root)[1]["blocked"] == ["53", "5353"]
    pane.keys("d")
    pane.type("53")
    pane.keys("Enter")
    pane.wait_text("@blocked: removed 1")
    assert kernel_values(pin_root)[1]["blocked"] == ["5353"]

    pane.keys("m")
    pane.wait_text("[audit]")
    with bpf.PinnedUnit.open(pin_root, UNIT) as u:
        assert u.mode() == "audit"


def test_typed_value_and_a_bad_one(unit, pin_root, tune):
    pane = tune(unit)
    pane.wait_text(f"$mtu = {MTU}")
    pane.keys("Enter")
    pane.type("1oo")
    pane.keys("Enter")
    pane.wait_text("error: param $mtu: '1oo' is not a number")
    assert kernel_values(pin_root)[0]["mtu"] == MTU
    pane.keys("Enter")
    pane.type(str(2**64))
    pane.keys("Enter")
    pane.wait_text("out of range")
    pane.keys("j", "a")
    pane.type("53,notaport")
    pane.keys("Enter")
    pane.wait_text("error: set @blocked")
    assert kernel_values(pin_root) == ({"mtu": MTU}, {"blocked": []})  # nothing changed, not even 53
    pane.keys("k", "Enter")
    pane.type("1400")
    pane.keys("Enter")
    wait_param(pin_root, 1400)


def egress_totals(screen: str) -> tuple[float, int] | None:
    """(drop packets/s, total drops) from the unit screen's egress counter line."""
    for line in screen.splitlines():
        if line.startswith(" egress  "):
            fields = line.split()
            return float(re.sub("[kMG]$", "", fields[3])), int(fields[-1])
    return None


def test_mtu_example(unit, pin_root, tune, temp_cgroup):
    """Datagrams of IP length 1000 leave the cgroup all the time: `-` puts $mtu below them and
    the drop counter rises on screen; `+` puts it back and the drops stop."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    tx = temp_cgroup.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stop = threading.Event()

    def send():
        while not stop.wait(0.01):
            try:
                tx.sendto(b"x" * (MTU - 28), rx.getsockname())  # 20 IP + 8 UDP
            except OSError:
                pass  # EPERM: the filter dropped it
            try:
                while True:
                    rx.recv(2048, socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        pane = tune(unit)
        pane.wait(lambda s: (t := egress_totals(s)) is not None and t[1] == 0 and "max 0/s" in s
                  and "▁▁" in s, "two refreshes without drops")
        pane.keys("-")
        pane.wait(lambda s: (t := egress_totals(s)) is not None and t[0] > 0 and t[1] > 20,
                  "the drop rate and counter rising")
        pane.keys("+")
        wait_param(pin_root, MTU)
        first = pane.wait(lambda s: (t := egress_totals(s)) is not None and t[0] == 0, "the drop rate at 0")
        stopped = egress_totals(first)[1]
        pane.wait(lambda s: egress_totals(s)[0] == 0 and egress_totals(s)[1] == stopped
                  and s != first, "a later refresh with no new drops")
        with bpf.PinnedUnit.open(pin_root, UNIT) as u:
            assert u.counters()["egress"]["drop"]["packets"] == stopped
            assert u.counters()["egress"]["pass"]["packets"] > 0
    finally:
        stop.set()
        sender.join()
        tx.close()
        rx.close()


def test_terminal_restored_after_q(unit, tune):
    pane = tune(unit)
    pane.wait_text(f"$mtu = {MTU}")
    assert pane.alternate_screen()
    pane.keys("q")
    assert pane.exit_status() == 0
    assert not pane.alternate_screen() and pane.cursor_visible()
    assert "VALUES" not in pane.screen()  # the full screen is gone, the shell's lines are back


def test_terminal_restored_after_ctrl_c(unit, tune):
    pane = tune()
    pane.wait_text(UNIT)
    pane.keys("C-c")
    assert pane.exit_status() == 130
    assert not pane.alternate_screen() and pane.cursor_visible()
    assert "Traceback" not in pane.screen()


def test_unit_unloaded_underneath(unit, pin_root, tune):
    pane = tune(unit)
    pane.wait_text(f"$mtu = {MTU}")
    bpf.unload(pin_root, UNIT)
    assert pane.exit_status() == 2
    screen = pane.screen()
    assert f"bpfwall: error: tune: {UNIT} was unloaded underneath; tune ended" in screen
    assert "Traceback" not in screen
    assert not pane.alternate_screen() and pane.cursor_visible()


def test_list_opens_a_unit_and_returns_when_it_is_unloaded(unit, pin_root, tune):
    pane = tune()
    pane.wait(lambda s: re.search(rf"{re.escape(UNIT)}\s+bpf\s+enforce\s+\d", s), "the unit's row with rates")
    pane.keys("Enter")
    pane.wait_text(f"$mtu = {MTU}")
    bpf.unload(pin_root, UNIT)
    pane.wait_text(f"{UNIT} was unloaded underneath")
    pane.wait_text("no units loaded")
    pane.keys("q")
    assert pane.exit_status() == 0
    assert not pane.alternate_screen()


def test_resize(unit, tune):
    pane = tune(unit)
    pane.wait_text(f"$mtu = {MTU}")
    pane.tmux("resize-window", "-x", "60", "-y", "16")
    pane.wait(lambda s: len(s.splitlines()) <= 16 and "q quit" in s.splitlines()[-1] + "q quit"
              and "$mtu" in s and "m enforce/audit" in s, "the screen redrawn at 60×16")
    pane.tmux("resize-window", "-x", "80", "-y", "24")
    pane.wait(lambda s: "Esc back  q quit" in s, "the screen redrawn at 80×24")


def test_event_panel(unit, pin_root, tune, temp_cgroup):
    """The latest drop events at the bottom of the unit's screen; a backend that has no drop
    events yet says so in the panel (tune keeps working)."""
    from bpfwall.backends.bpf_backend import BpfBackend

    pane = tune(unit)
    pane.wait_text(f"$mtu = {MTU}")
    if not hasattr(BpfBackend, "events"):
        pane.wait_text("drop events: not available on this backend yet")
        return
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    tx = temp_cgroup.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for _ in range(3):
            try:
                tx.sendto(b"x" * MTU, rx.getsockname())  # IP length MTU + 28: dropped
            except OSError:
                pass
        # 80 columns cut the line before its length: the addresses say which packets they are
        pane.wait(lambda s: f"{UNIT} egress DROP udp 127.0.0.1:" in s, "the drop events")
    finally:
        tx.close()
        rx.close()
