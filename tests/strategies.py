"""Hypothesis strategies shared by the unit and kernel tiers.

`expressions()` draws well-typed filter texts that use every feature of the
language; `packets()` draws raw L3 packets. Both take addresses, ports and ICMP
types from the same small pools so that expressions match packets often.
"""
from __future__ import annotations

import ipaddress

from hypothesis import strategies as st

from bpfwall.lang import ast
from bpfwall.lang.fields import ADDRESS_NAMES, field_type
from tests.unit import packets as pk

# The last hosts lie at the edges of systemd's address names (link-local, multicast).
V4_HOSTS = ["10.0.0.1", "10.0.0.2", "10.1.2.3", "192.168.1.1", "127.0.0.1", "0.0.0.0", "255.255.255.255",
            "169.254.255.255", "224.0.0.251", "240.0.0.1"]
V6_HOSTS = ["::1", "fe80::1", "2001:db8::1", "2001:db8::2", "2001:db8:1::5", "::ffff:10.0.0.1", "::",
            "fe80:0:0:1::1", "ff02::fb", "::2"]
V4_NETS = ["10.0.0.0/8", "10.0.0.0/24", "10.0.0.2/31", "10.0.0.1/32", "192.168.0.0/16", "127.0.0.0/8",
           "0.0.0.0/0"]
V6_NETS = ["2001:db8::/32", "2001:db8::/127", "fe80::/10", "::1/128", "::ffff:0:0/96", "::/0"]
PORTS = [0, 1, 22, 53, 80, 443, 1024, 8080, 65535]
# Devices packets come by (the kernel tier makes them in a namespace of its own) and the names
# and patterns expressions match them with.
DEVICES = ["lo", "wg0", "eth0", "wlan0", "wlan10"]
IFNAME_PATTERNS = ["lo", "l*", "wg0", "wg*", "eth0", "eth1", "wlan*", "wlan1*", "wlan0", "*"]
ICMP4_TYPES, ICMP6_TYPES = [0, 3, 8, 11], [1, 128, 129, 135]
ICMP_TYPES = ICMP4_TYPES + ICMP6_TYPES
LENGTHS = [20, 28, 40, 48, 60, 64, 100, 1500]

BOOL_FIELDS = ["ip", "ipv6", "icmp", "tcp", "udp"]
NUMBER_FIELDS = ["src_port", "dst_port", "len", "icmp_type", "icmp_code", "local_port", "remote_port"]
ADDR_FIELDS = ["saddr", "daddr", "local_addr", "remote_addr"]
PARAMS = ["a", "b", "limit"]
NUMBER_SETS = ["ports", "nums"]
ADDRESS_SETS = ["nets", "hosts"]
COMPARE_OPS = ["==", "!=", "<", "<=", ">", ">="]

_COL = 1  # generated trees have no source text


def mostly(common, rare, odds: int = 3):
    """`common` `odds` times out of odds + 1 (one_of would weigh its branches alike)."""
    return st.integers(0, odds).flatmap(lambda i: rare if i == 0 else common)


# -- values ---------------------------------------------------------------


def _pool(field: str) -> list[int]:
    if field.endswith("port"):
        return PORTS
    if field == "len":
        return LENGTHS
    return ICMP_TYPES if field == "icmp_type" else [0, 1, 3, 4]


def number_literals(field: str | None = None):
    """Numbers that fit `field` (u64 when None), mostly from the pools the packets use."""
    if field is None:
        return mostly(st.sampled_from(PORTS), st.integers(0, 2**64 - 1), odds=1)
    top = 2 ** field_type(field)[1] - 1
    return mostly(st.sampled_from([v for v in _pool(field) if v <= top]), st.integers(0, top))


def _num(field=None):
    return number_literals(field).map(lambda v: ast.NumLit(v, _COL))


_params = st.sampled_from(PARAMS).map(lambda n: ast.Param(n, _COL))
_hosts = st.sampled_from(V4_HOSTS + V6_HOSTS).map(lambda a: ast.AddrLit(ipaddress.ip_network(a), False, _COL))
_nets = mostly(st.sampled_from(V4_NETS + V6_NETS).map(lambda n: ast.AddrLit(ipaddress.ip_network(n), True, _COL)),
              st.sampled_from(sorted(ADDRESS_NAMES)).map(lambda n: ast.AddrName(n, _COL)))


def _field(names):
    return st.sampled_from(names).map(lambda n: ast.Field(n, _COL))


def _bound(field):
    return st.one_of(_num(field), _params)


@st.composite
def _range(draw, field):
    lo, hi = draw(_bound(field)), draw(_bound(field))
    if isinstance(lo, ast.NumLit) and isinstance(hi, ast.NumLit) and lo.value > hi.value:
        lo, hi = hi, lo
    return ast.Range(lo, hi, _COL)


# -- conditions -----------------------------------------------------------


@st.composite
def _number_compare(draw):
    field = draw(st.sampled_from(NUMBER_FIELDS))
    left = ast.Field(field, _COL)
    right = draw(st.one_of(_num(field), _params, _field(NUMBER_FIELDS)))
    if draw(st.integers(0, 9)) == 0:  # no field: params and literals meet as u64
        left, right = draw(st.one_of(_params, _num())), draw(st.one_of(_params, _num()))
    if draw(st.booleans()):
        left, right = right, left
    return ast.Compare(draw(st.sampled_from(COMPARE_OPS)), left, right, _COL)


@st.composite
def _address_compare(draw):
    left = draw(mostly(_field(ADDR_FIELDS), _hosts, odds=9))  # two literals compare as constants
    right = draw(mostly(_hosts, _field(ADDR_FIELDS)))
    if draw(st.booleans()):
        left, right = right, left
    return ast.Compare(draw(st.sampled_from(["==", "!="])), left, right, _COL)


@st.composite
def _number_in(draw):
    field = draw(st.sampled_from(NUMBER_FIELDS))
    subject = ast.Field(field, _COL) if draw(st.integers(0, 7)) else draw(_params)
    limit = field if isinstance(subject, ast.Field) else None
    item = st.one_of(_num(limit), _params, _range(limit))
    boxes = [_range(limit), st.lists(item, min_size=1, max_size=4).map(lambda i: ast.SetLit(tuple(i), _COL))]
    if limit:  # only fields are looked up in @sets
        boxes.append(st.sampled_from(NUMBER_SETS).map(lambda n: ast.SetRef(n, _COL)))
    return ast.In(subject, draw(st.one_of(boxes)), _COL)


@st.composite
def _address_in(draw):
    subject = draw(mostly(_field(ADDR_FIELDS), _hosts, odds=9))
    boxes = [_nets, st.lists(st.one_of(_hosts, _nets), min_size=1, max_size=4).map(lambda i: ast.SetLit(tuple(i), _COL))]
    if isinstance(subject, ast.Field):
        boxes.append(st.sampled_from(ADDRESS_SETS).map(lambda n: ast.SetRef(n, _COL)))
    return ast.In(subject, draw(st.one_of(boxes)), _COL)


_patterns = st.sampled_from(IFNAME_PATTERNS).map(lambda p: ast.StrLit(p, _COL))


@st.composite
def _interface_compare(draw):
    left, right = ast.Field("ifname", _COL), draw(_patterns)
    if draw(st.booleans()):
        left, right = right, left
    return ast.Compare(draw(st.sampled_from(["==", "!="])), left, right, _COL)


_interface_in = st.lists(_patterns, min_size=1, max_size=3).map(
    lambda items: ast.In(ast.Field("ifname", _COL), ast.SetLit(tuple(items), _COL), _COL))

_leaves = mostly(st.one_of(_field(BOOL_FIELDS), _number_compare(), _address_compare(), _number_in(), _address_in(),
                           _interface_compare(), _interface_in),
                 st.booleans().map(lambda b: ast.BoolConst(b, _COL)), odds=9)


def trees(max_leaves: int = 12):
    """Well-typed ASTs (columns are all 1)."""
    def extend(children):
        operands = st.lists(children, min_size=2, max_size=4).map(tuple)
        return st.one_of(children.map(lambda c: ast.Not(c, _COL)),
                         operands.map(lambda o: ast.And(o, _COL)),
                         operands.map(lambda o: ast.Or(o, _COL)))
    return st.recursive(_leaves, extend, max_leaves=max_leaves)


# -- texts ------------------------------------------------------------------

_LEVEL = {ast.Or: 0, ast.And: 1, ast.Not: 2, ast.Compare: 3, ast.In: 3}


@st.composite
def spell(draw, node, parent: int = 0) -> str:
    """Text for `node` with random spellings, spacing and redundant parentheses."""
    level = _LEVEL.get(type(node), 4)
    if isinstance(node, (ast.And, ast.Or)):
        op = draw(st.sampled_from(["&&", " && ", " and "] if isinstance(node, ast.And) else ["||", " || ", " or "]))
        text = op.join(draw(spell(o, level + 1)) for o in node.operands)
    elif isinstance(node, ast.Not):
        text = draw(st.sampled_from(["!", "! ", "not "])) + draw(spell(node.operand, level))
    elif isinstance(node, ast.Compare):
        op = draw(st.sampled_from([node.op, f" {node.op} "]))
        text = draw(spell(node.left, 4)) + op + draw(spell(node.right, 4))
    elif isinstance(node, ast.In):
        text = f"{draw(spell(node.subject, 4))} in {draw(spell(node.container, 4))}"
    elif isinstance(node, ast.Range):
        text = f"{draw(spell(node.lo))}..{draw(spell(node.hi))}"
    elif isinstance(node, ast.SetLit):
        sep = draw(st.sampled_from([",", ", ", " , "]))
        text = "{" + sep.join(draw(spell(i)) for i in node.items) + "}"
    elif isinstance(node, ast.NumLit):
        text = hex(node.value) if draw(st.integers(0, 4)) == 0 else str(node.value)
    elif isinstance(node, ast.AddrLit):
        addr = node.net.network_address
        if node.net.version == 6 and draw(st.booleans()):
            addr = addr.exploded
        text = f"{addr}/{node.net.prefixlen}" if node.cidr else str(addr)
    elif isinstance(node, ast.Param):
        text = "$" + node.name
    elif isinstance(node, ast.SetRef):
        text = "@" + node.name
    elif isinstance(node, ast.BoolConst):
        text = "true" if node.value else "false"
    elif isinstance(node, ast.StrLit):
        text = f'"{node.value}"'
    else:  # Field, AddrName
        text = node.name
    # Conditions weaker than their context need parentheses; any condition may have them.
    if level < parent or (level < 4 and draw(st.integers(0, 5)) == 0):
        text = f"({text})"
    return text


@st.composite
def expressions(draw, max_leaves: int = 12) -> str:
    """Well-typed expression texts covering every feature of the language."""
    return draw(spell(draw(trees(max_leaves))))


# -- values for params and sets --------------------------------------------


def param_values():
    return st.one_of(st.sampled_from([0, 1, 53, 80, 443, 1500, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1]),
                     st.integers(0, 1600), st.integers(0, 2**64 - 1))


def set_values(kind: str):
    """Elements as parse_set_elements returns them; number ranges stay small (sets expand them)."""
    if kind == "number":
        value = mostly(st.sampled_from(PORTS + ICMP_TYPES + LENGTHS), st.integers(0, 2**32 - 1))
        span = st.tuples(st.integers(0, 2**32 - 1 - 32), st.integers(0, 32)).map(lambda t: (t[0], t[0] + t[1]))
        small = st.tuples(st.integers(0, 1600), st.integers(0, 32)).map(lambda t: (t[0], t[0] + t[1]))
        return st.lists(mostly(value, st.one_of(small, span), odds=2), max_size=8)
    if kind != "address":
        raise ValueError(kind)
    nets = st.sampled_from(V4_HOSTS + V6_HOSTS + V4_NETS + V6_NETS).map(ipaddress.ip_network)
    return st.lists(nets, max_size=6)


# -- packets ----------------------------------------------------------------


@st.composite
def _l4(draw, proto: int) -> bytes:
    """An L4 header for `proto`, sometimes cut short."""
    port = mostly(st.sampled_from(PORTS), st.integers(0, 65535))
    if proto == pk.TCP:
        data = pk.tcp(draw(port), draw(port))
    elif proto == pk.UDP:
        data = pk.udp(draw(port), draw(port), bytes(draw(st.integers(0, 4))))
    elif proto in (pk.ICMP, pk.ICMPV6):
        types = ICMP4_TYPES if proto == pk.ICMP else ICMP6_TYPES
        data = pk.icmp(draw(mostly(st.sampled_from(types), st.integers(0, 255))),
                       draw(mostly(st.sampled_from([0, 1, 3]), st.integers(0, 255))))
    else:
        data = draw(st.binary(max_size=12))
    if draw(st.integers(0, 5)) == 0:
        data = data[:draw(st.integers(0, 6))]
    return data


def _proto(family: int):
    """Mostly the protocols expressions name; sometimes anything."""
    native = pk.ICMP if family == 4 else pk.ICMPV6
    other = pk.ICMPV6 if family == 4 else pk.ICMP
    rare = st.one_of(st.sampled_from([other, 47, 132]), st.integers(0, 255))
    return mostly(st.sampled_from([pk.TCP, pk.UDP, native]), rare, odds=4)


def _addresses(family: int):
    hosts = V4_HOSTS if family == 4 else V6_HOSTS
    cls = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
    random = st.integers(0, 2 ** (32 if family == 4 else 128) - 1).map(lambda v: str(cls(v)))
    return mostly(st.sampled_from(hosts), random)


@st.composite
def _v4(draw) -> bytes:
    proto = draw(_proto(4))
    options = bytes(4 * draw(st.integers(0, 10)) if draw(st.integers(0, 3)) == 0 else 0)
    frag = draw(st.integers(1, 0x1FFF)) if draw(st.integers(0, 7)) == 0 else 0
    data = pk.ipv4(draw(_addresses(4)), draw(_addresses(4)), proto, draw(_l4(proto)), options, frag,
                   more_fragments=draw(st.booleans()))
    if draw(st.integers(0, 11)) == 0:  # a header length nibble that lies
        data = bytes([0x40 | draw(st.integers(0, 15))]) + data[1:]
    return data


_EXT = st.one_of(
    st.tuples(st.sampled_from([pk.HOPOPTS, pk.ROUTING, pk.DSTOPTS]), st.integers(0, 2)),
    st.tuples(st.just(pk.AH), st.integers(0, 4)),
    st.tuples(st.just(pk.FRAGMENT), st.just(0),
              mostly(st.just(0), st.integers(1, 0x1FFF), odds=2)),
)


@st.composite
def _v6(draw) -> bytes:
    proto = draw(_proto(6))
    chains = mostly(st.lists(_EXT, min_size=1, max_size=3), st.lists(_EXT, min_size=8, max_size=10))
    kinds = draw(chains) if draw(st.booleans()) else []
    nh, headers = pk.chain(kinds, proto)
    return pk.ipv6(draw(_addresses(6)), draw(_addresses(6)), nh, headers + draw(_l4(proto)))


@st.composite
def packets(draw) -> bytes:
    """Raw L3 packets (IPv4 or IPv6), sometimes truncated after the fixed header."""
    data = draw(st.one_of(_v4(), _v6()))
    fixed = 20 if data[0] >> 4 == 4 else 40
    if draw(st.integers(0, 9)) == 0:
        data = data[:draw(st.integers(fixed, len(data)))]
    return data


PACKETS_PER_EXAMPLE = 24


@st.composite
def scenarios(draw):
    """An oracle test case: (checked expression, direction, param values, set values, packets,
    load_bytes_only)."""
    from bpfwall.lang.checker import analyze

    text = draw(expressions())
    checked = analyze(text)
    direction = draw(st.sampled_from(["ingress", "egress"]))
    params = {name: draw(param_values()) for name in checked.params}
    sets = {name: draw(set_values(kind)) for name, kind in checked.sets.items()}
    batch = draw(st.lists(packets(), min_size=PACKETS_PER_EXAMPLE, max_size=PACKETS_PER_EXAMPLE))
    # Half the programs read every header through bpf_skb_load_bytes: the path real
    # traffic takes for bytes outside the linear area must decide the same way.
    load_bytes_only = draw(st.booleans())
    return checked, direction, params, sets, batch, load_bytes_only
