"""tune's pure logic: rates from two counter reads, the drop-rate history, what keys ask for."""
from bpfwall.commands.filters import parse_change
from bpfwall.tune import model


def counters(pass_packets, drop_packets, size=100):
    return {"egress": {"pass": {"packets": pass_packets, "bytes": pass_packets * size},
                       "drop": {"packets": drop_packets, "bytes": drop_packets * size}}}


def test_rates_between_two_reads():
    r = model.rates(counters(10, 0), counters(30, 8), 2.0)
    assert r["egress"]["pass"] == {"packets": 10.0, "bytes": 1000.0}
    assert r["egress"]["drop"] == {"packets": 4.0, "bytes": 400.0}


def test_counter_that_went_down_counts_from_zero():
    # a reload gives the unit new counters: no negative rate
    assert model.rates(counters(100, 50), counters(4, 2), 1.0)["egress"]["drop"]["packets"] == 2.0


def test_sampler_history_holds_drop_rates():
    s = model.Sampler()
    for t, dropped in enumerate((0, 5, 5, 25)):
        s.add(float(t), counters(0, dropped))
    assert list(s.drop_history) == [5.0, 0.0, 20.0]
    for t in range(4, 4 + model.HISTORY_SECONDS + 5):
        s.add(float(t), counters(0, 25))
    assert len(s.drop_history) == model.HISTORY_SECONDS


def test_sparkline_scales_to_its_maximum():
    assert model.sparkline([0, 4, 8], 10) == "▁▅█"
    assert model.sparkline([0, 0], 10) == "▁▁"
    assert model.sparkline([0, 7, 14], 10, model.SPARK_ASCII) == "_=#"
    assert model.sparkline(range(100), 5) == model.sparkline([95, 96, 97, 98, 99], 5)  # the last `width`


def test_human():
    assert model.human(950) == "950"
    assert model.human(12345) == "12.3k"
    assert model.human(0.5) == "0.5"


def unit_screen(**params):
    s = model.UnitScreen("bpf", "demo.service")
    s.update({"mode": "enforce", "params": params or {"mtu": 1500}, "sets": {"blocked": ["10.0.0.1/32"]},
              "counters": counters(0, 0)}, 0.0)
    return s


def test_plus_minus_and_shift_steps():
    s = unit_screen()
    assert s.key("+") == "mtu=1501"
    assert s.key("=") == "mtu=1501"  # the unshifted '+' key
    assert s.key("-") == "mtu=1499"
    assert s.key("*") == "mtu=1510"
    assert s.key("_") == "mtu=1490"
    s.key("s")
    assert s.step == 10 and s.key("-") == "mtu=1490" and s.key("_") == "mtu=1400"
    # every change is text `bpfwall set` parses
    assert parse_change(s.key("+")) == ("param", "mtu", 1510)


def test_below_zero_is_asked_for_and_refused_by_the_parser():
    import pytest

    from bpfwall.errors import Error

    s = unit_screen(mtu=0)
    with pytest.raises(Error):
        parse_change(s.key("-"))


def test_typed_value():
    s = unit_screen()
    assert s.key(model.ENTER) is None and s.edit is not None
    for ch in "1x":
        s.key(ch)
    s.key(model.BACKSPACE)
    s.key("2")
    assert s.key(model.ENTER) == "mtu=12" and s.edit is None


def test_escape_cancels_typing_then_goes_back():
    s = unit_screen()
    s.key(model.ENTER)
    s.key("9")
    assert s.key(model.ESCAPE) is None and s.edit is None
    assert s.key(model.ESCAPE) == "back"


def test_set_elements_added_and_removed():
    s = unit_screen()
    s.key(model.DOWN)
    assert s.rows[s.selected].kind == "set"
    s.key("a")
    for ch in "10.0.0.2":
        s.key(ch)
    assert s.key(model.ENTER) == "@blocked+10.0.0.2"
    s.key("d")
    for ch in "10.0.0.1":
        s.key(ch)
    assert parse_change(s.key(model.ENTER)) == ("set", "blocked", "-", "10.0.0.1")


def test_mode_toggles():
    s = unit_screen()
    assert s.key("m") == "mode=audit"
    s.update({**s.stats, "mode": "audit"}, 1.0)
    assert s.key("m") == "mode=enforce"


def test_list_keeps_the_selected_unit_when_rows_change():
    ls = model.ListScreen()
    ls.update({("bpf", "b.service"): {}, ("nft", "c.service"): {}}, {}, 0.0)
    ls.key(model.DOWN)
    assert ls.rows[ls.selected] == ("nft", "c.service")
    ls.update({("bpf", "a.service"): {}, ("bpf", "b.service"): {}, ("nft", "c.service"): {}}, {}, 1.0)
    assert ls.rows[ls.selected] == ("nft", "c.service")
    assert ls.key(model.ENTER) == ("nft", "c.service")
    ls.update({}, {}, 2.0)
    assert ls.key(model.ENTER) is None and ls.key("q") == "quit"
