"""Drop-event settings without root: the policy's log_rate/log_burst keys, and the nft log
prefixes that name a unit's events (bounded to what the kernel keeps, one per unit and direction)."""
from __future__ import annotations

from bpfwall.events import DEFAULT_LOG_BURST, DEFAULT_LOG_RATE
from bpfwall.nft.names import PREFIX_MAX, UnitNames
from bpfwall.policy.schema import check_document


def entries(text: str):
    result = check_document("/etc/bpfwall/p.toml", text)
    return result.entries, result.errors


def test_policy_log_settings_per_unit_and_from_defaults():
    got, errors = entries('[defaults]\nlog_burst = 4\n[units."a.service"]\negress = "tcp"\nlog_rate = 0\n'
                          '[units."b.service"]\negress = "tcp"\n')
    assert errors == []
    assert {e.name: (e.log_rate, e.log_burst) for e in got} == {"a.service": (0, 4), "b.service": (DEFAULT_LOG_RATE, 4)}


def test_policy_bad_log_settings_are_one_line_each():
    _, errors = entries('[units."a.service"]\negress = "tcp"\nlog_rate = -1\nlog_burst = "5"\n')
    assert len(errors) == 2
    assert 'units."a.service".log_rate: -1 is out of range (0..1000000' in errors[0]
    assert 'units."a.service".log_burst: expected an integer' in errors[1] and 'got a string' in errors[1]


def test_default_settings_keep_the_fingerprint():
    """Entries that leave the settings out fingerprint as before events existed (no reload on upgrade)."""
    (plain,), _ = entries('[units."a.service"]\negress = "tcp"\n')
    (same,), _ = entries(f'[units."a.service"]\negress = "tcp"\nlog_rate = {DEFAULT_LOG_RATE}\n'
                         f'log_burst = {DEFAULT_LOG_BURST}\n')
    (other,), _ = entries('[units."a.service"]\negress = "tcp"\nlog_rate = 3\n')
    assert "log_rate" not in plain.filter_spec()
    assert plain.fingerprint() == same.fingerprint() != other.fingerprint()


def test_log_prefixes_fit_and_are_distinct():
    units = ["a.service", "x" * 240 + ".service", "x" * 240 + "y.service", "getty@tty1.service"]
    prefixes = [UnitNames(u).log_prefix(d, v) for u in units for d in ("ingress", "egress") for v in ("drop", "audit")]
    assert all(len(p.encode()) <= PREFIX_MAX for p in prefixes)
    assert len(set(prefixes)) == len(prefixes)
    assert UnitNames("a.service").log_prefix("ingress", "drop") == "a.service/in drop"
