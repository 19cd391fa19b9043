"""Policy files: which filter each systemd unit gets.

/etc/bpfwall/*.toml (or --policy-dir DIR, or $BPFWALL_POLICY_DIR), read in
name order:

    [defaults]                      # optional; applies to this file's units
    backend = "bpf"                 # "bpf" | "nft"
    mode = "enforce"                # "enforce" | "audit"
    set_capacity = 4096             # elements each @set can hold (see README: what it costs)
    force_capacity = false          # true: allow sets estimated at more than 256 MiB per unit

    [units."nginx.service"]         # a unit name, or a glob: [units."app-firefox-*.scope"]
    ingress = "tcp && local_port in {80, 443, $admin_port}"
    egress  = "udp && remote_port == 53 || tcp"
    params  = { admin_port = 8443 } # every $param the expressions use needs a value
    sets    = { admins = ["10.0.0.0/8"] }   # every @set they use must be listed ([] is fine)
    mode    = "audit"               # overrides [defaults]
    strict  = true                  # slice defaults only: drop a descendant until its own filter is on
    cgroup  = "user@1000.service/app.slice/*"   # optional glob on the cgroup path

Every error is one line `FILE:LINE: key.path: message`; unknown keys, wrong
types, bad expressions, missing or unused params and sets, and a unit defined
twice are all errors. Which entry sits on which cgroup: see match.py; which entry
judges a cgroup's packets (its own, else the nearest slice default): judge.py. Files
are read only where nobody but root (or the euid) can write: see load.py.
"""
from .entry import Entry, PolicyError, show_element
from .load import DEFAULT_POLICY_DIR, check_policy, load_policy, policy_dir, policy_files
from .judge import Holder, Judgement, judge
from .match import UNIT_SUFFIXES, MatchReport, Policy, cgroup_glob_matches, is_slice_name, unit_component

__all__ = ["Entry", "PolicyError", "Policy", "MatchReport", "load_policy", "check_policy", "policy_dir",
           "policy_files", "DEFAULT_POLICY_DIR", "UNIT_SUFFIXES", "cgroup_glob_matches", "unit_component",
           "show_element", "judge", "Judgement", "Holder", "is_slice_name"]
