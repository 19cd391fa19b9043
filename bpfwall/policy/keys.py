"""What each policy key means, in words: the text of bpfwall.toml(5) (bpfwall/manpage.py).

schema.py decides what is valid; this says what it is for. tests/unit/test_manpage.py checks
that every key schema.py accepts is described here and nothing else is, so the page cannot fall
behind the schema.
"""
from __future__ import annotations

# Keys of [defaults] and of a [units."NAME"] table (each may also be set per unit).
SETTINGS = {
    "backend": "How the unit is filtered: \"bpf\" (a cgroup_skb eBPF program pinned under the pin "
               "root and attached to the unit's cgroup) or \"nft\" (a rule in bpfwall's nftables table "
               "matching the cgroup with socket cgroupv2).",
    "mode": "\"enforce\" drops what the filter refuses; \"audit\" lets every packet pass and counts "
            "the would-be drops.",
    "set_capacity": "Elements each @set of the unit can hold (a range a..b takes b - a + 1 of them). "
                    "Kernel memory is charged for it when the unit is loaded.",
    "force_capacity": "true allows a set_capacity whose sets would take more kernel memory than "
                      "bpfwall allows unforced.",
    "log_rate": "Drop events per second and direction, at most (0: none). `bpfwall set UNIT "
                "log_rate=N` changes it live.",
    "log_burst": "Drop events allowed at once above log_rate.",
    "compiler": "What compiles the unit's bpf programs: \"clang\" (the clang binary), \"bcc\" "
                "(python3-bpfcc, with a kernel's headers) or \"auto\" (clang when found, else bcc). "
                "The same program either way; --compiler or $BPFWALL_COMPILER wins over it. Default: "
                "\"auto\".",
}

# Keys only a [units."NAME"] table has.
UNIT_ONLY = {
    "ingress": "The filter for packets the unit receives: an expression of bpfwall's filter "
               "language (see bpfwall(1), FILTER LANGUAGE). True passes the packet, false drops it. "
               "A direction left out is not filtered by this entry (it falls to the nearest slice "
               "default, if any); at least one of ingress and egress is needed.",
    "egress": "The filter for packets the unit sends.",
    "params": "Values of the $params the expressions use, a table of NAME = NUMBER. Every $param "
              "used needs one; `bpfwall set UNIT NAME=VALUE` changes it live.",
    "sets": "Elements of the @sets the expressions use, a table of NAME = [\"E1\", \"E2\", ...]: "
            "numbers, ranges \"lo..hi\", addresses or networks. Every @set used needs one "
            "(possibly empty).",
    "strict": "Only for a slice default (a name ending in .slice): true drops the traffic of every "
              "cgroup below the slice until bpfwall has seen it and put its own filter on, so nothing "
              "there is unpoliced for an instant. Elsewhere an error.",
    "cgroup": "Only for a glob entry: a glob on the unit's cgroup path below the cgroup2 root "
              "(`*` stays within one path component, `**` spans several), e.g. "
              "\"user@*.service/app.slice/*\".",
    "ip_address_allow": "As systemd's IPAddressAllow=: [\"10.0.0.0/8 fd00::/8\", \"localhost\"] "
                        "(addresses, networks, any, localhost, link-local, multicast). A packet whose "
                        "remote address (the source of an incoming, the destination of an outgoing "
                        "packet) is listed passes the lists, whatever ip_address_deny says.",
    "ip_address_deny": "As systemd's IPAddressDeny=: a packet whose remote address is listed here and "
                       "not in ip_address_allow is dropped; one in neither list passes. The lists apply "
                       "to both directions and must pass as well as ingress/egress: the filter is "
                       "(lists) && (expression). `bpfwall import-systemd UNIT` prints them for a unit.",
}
