"""AST → the C of `bpfwall_filter.h`, included by bpf/port_filter.c.

Only the checked AST reaches this module, never expression text: identifiers
come from the language's own tables (fields), or are names the lexer limited to
[A-Za-z_][A-Za-z0-9_]* (params, sets); numbers and addresses are emitted as
integer constants.
"""
from __future__ import annotations

from ..lang import ast
from ..lang.fields import ADDR, IFACE, field_type, resolve
from ..program_contract import IFACES, IFACES_CAPACITY, set_map

# Boolean fields as C conditions on `struct pkt *p`.
_BOOL_C = {
    "ip": "(p->family == 4)",
    "ipv6": "(p->family == 6)",
    "icmp": "p->is_icmp",
    "tcp": "(p->proto == 6)",
    "udp": "(p->proto == 17)",
}
_NUMBER_C = {
    "src_port": "p->sport",
    "dst_port": "p->dport",
    "len": "p->len",
    "icmp_type": "p->icmp_type",
    "icmp_code": "p->icmp_code",
}
_ADDR_C = {"saddr": "p->saddr", "daddr": "p->daddr"}

# Conditions that test one member of struct pkt for one value: a packet has one family and one
# L4 protocol, so two of them on one member with different values make a conjunction false.
_EXCLUSIVE = {_BOOL_C[name]: (member, value) for name, member, value in
              (("ip", "family", 4), ("ipv6", "family", 6), ("tcp", "proto", 6), ("udp", "proto", 17))}
# `x op x`, decided without the packet.
_REFLEXIVE = {"==": "1", "<=": "1", ">=": "1", "!=": "0", "<": "0", ">": "0"}

_C_KEYWORDS = frozenset("""auto break case char const continue default do double else enum extern
float for goto if inline int long register restrict return short signed sizeof static struct
switch typedef union unsigned void volatile while _Bool _Complex _Imaginary""".split())


def param_member(name: str) -> str:
    """The member of struct bpfwall_params that holds $name (readable in map dumps)."""
    return name + "_" if name in _C_KEYWORDS else name


class _Emitter:
    def __init__(self, direction: str, interfaces=()):
        self.direction = direction
        self.bit = {name: i for i, name in enumerate(interfaces)}  # the unit's interface names

    def cond(self, node) -> str:
        """A C expression that is non-zero when the boolean node holds."""
        if isinstance(node, ast.BoolConst):
            return "1" if node.value else "0"
        if isinstance(node, ast.Field):
            return _BOOL_C[self.field(node)]
        if isinstance(node, ast.Not):
            return f"!{self.cond(node.operand)}"
        if isinstance(node, ast.And):
            terms = [self.cond(o) for o in node.operands]
            return "0" if _contradict(terms) else "(" + " && ".join(terms) + ")"
        if isinstance(node, ast.Or):
            return "(" + " || ".join(self.cond(o) for o in node.operands) + ")"
        if isinstance(node, ast.Compare):
            return self.compare(node)
        if isinstance(node, ast.In):
            return self.membership(node)
        raise TypeError(f"not a condition: {node!r}")

    def field(self, node: ast.Field) -> str:
        return resolve(node.name, self.direction)

    # -- numbers ---------------------------------------------------------
    def number(self, node) -> str:
        if isinstance(node, ast.NumLit):
            return f"{node.value}ULL"
        if isinstance(node, ast.Param):
            return f"prm->{param_member(node.name)}"
        if isinstance(node, ast.Field):
            return f"(__u64){_NUMBER_C[self.field(node)]}"
        raise TypeError(f"not a number: {node!r}")

    def in_range(self, value: str, rng: ast.Range) -> str:
        return f"({_relation(value, '>=', self.number(rng.lo))} && {_relation(value, '<=', self.number(rng.hi))})"

    # -- addresses -------------------------------------------------------
    def is_address(self, node) -> bool:
        if isinstance(node, ast.AddrLit):
            return True
        return isinstance(node, ast.Field) and field_type(node.name)[0] == ADDR

    def addr_words(self, node: ast.Field) -> str:
        return _ADDR_C[self.field(node)]

    @staticmethod
    def net_match(words: str, net) -> str:
        """`words` (4 network-order u32) lies in `net`, a network of one family."""
        terms = [f"(p->family == {net.version})"]
        nbits = 32 if net.version == 4 else 128
        addr = int(net.network_address)
        for i in range(nbits // 32):
            shift = nbits - 32 * (i + 1)
            word = (addr >> shift) & 0xFFFFFFFF
            covered = min(max(net.prefixlen - 32 * i, 0), 32)
            if covered == 0:
                continue
            mask = (0xFFFFFFFF << (32 - covered)) & 0xFFFFFFFF
            if mask == 0xFFFFFFFF:
                terms.append(f"{words}[{i}] == bpf_htonl({word:#010x}U)")
            else:
                terms.append(f"({words}[{i}] & bpf_htonl({mask:#010x}U)) == bpf_htonl({word:#010x}U)")
        return terms[0] if len(terms) == 1 else "(" + " && ".join(terms) + ")"

    def addr_equal(self, left, right) -> str:
        if isinstance(left, ast.AddrLit) and isinstance(right, ast.AddrLit):
            return "1" if left.net == right.net else "0"
        if isinstance(left, ast.AddrLit):
            left, right = right, left
        if isinstance(right, ast.AddrLit):
            return self.net_match(self.addr_words(left), right.net)
        # Two fields of one packet: same family by construction; IPv4 leaves words 1..3 zero.
        a, b = self.addr_words(left), self.addr_words(right)
        if a == b:  # saddr == saddr: true, and in C a self-comparison warning
            return "1"
        return "(" + " && ".join(f"{a}[{i}] == {b}[{i}]" for i in range(4)) + ")"

    # -- interfaces: bits of p->ifaces (user space resolves names to devices) --
    def is_interface(self, node) -> bool:
        return isinstance(node, ast.StrLit) or isinstance(node, ast.Field) and field_type(node.name)[0] == IFACE

    def interfaces(self, names) -> str:
        mask = 0
        for name in names:
            mask |= 1 << self.bit[name]
        return f"((p->ifaces & {mask:#x}ULL) != 0)"

    # -- comparisons -----------------------------------------------------
    def compare(self, node: ast.Compare) -> str:
        if self.is_interface(node.left):
            names = [n.value for n in (node.left, node.right) if isinstance(n, ast.StrLit)]
            hit = self.interfaces(names) if names else "1"  # ifname == ifname
            return hit if node.op == "==" else f"!{hit}"
        if self.is_address(node.left) or self.is_address(node.right):
            eq = self.addr_equal(node.left, node.right)
            return eq if node.op == "==" else f"!{eq}"
        return f"({_relation(self.number(node.left), node.op, self.number(node.right))})"

    def membership(self, node: ast.In) -> str:
        subject, box = node.subject, node.container
        if self.is_interface(subject):
            return self.interfaces([item.value for item in box.items])
        if self.is_address(subject):
            if isinstance(box, (ast.AddrLit, ast.AddrName)):
                return self.addr_in(subject, box)
            if isinstance(box, ast.SetRef):
                return f"in_address_set(&{set_map(box.name)}, p, {self.addr_words(subject)})"
            return "(" + " || ".join(self.addr_in(subject, item) for item in box.items) + ")"
        value = self.number(subject)
        if isinstance(box, ast.Range):
            return self.in_range(value, box)
        if isinstance(box, ast.SetRef):
            return f"in_number_set(&{set_map(box.name)}, (__u32){value})"
        terms = []
        for item in box.items:
            if isinstance(item, ast.Range):
                terms.append(self.in_range(value, item))
            else:
                terms.append(_relation(value, "==", self.number(item)))
        return "(" + " || ".join(terms) + ")"

    def addr_in(self, subject, item) -> str:
        """`subject` lies in `item`, an address literal or name."""
        terms = []
        for net in ast.networks(item):
            if isinstance(subject, ast.AddrLit):
                terms.append("1" if subject.net.version == net.version and subject.net.subnet_of(net) else "0")
            else:
                terms.append(self.net_match(self.addr_words(subject), net))
        return terms[0] if len(terms) == 1 else "(" + " || ".join(terms) + ")"


# Lookups in @set maps, emitted only when the unit has a set of that kind: a helper nobody
# calls is an unused-function warning, and the C is compiled with -Wall.
#
# found(): whether a lookup found its key, as an int the compiler cannot fold back into the
# pointer. LLVM turns `(v != 0) || (x != 0)` into `(v | x) != 0`, arithmetic on a map value that
# the verifier refuses before its null check (bcc's LLVM did, on `saddr in @hosts || ifname in
# {…}`); the empty asm makes the int opaque, so what follows works on it, not on the pointer.
_FOUND = """static __always_inline int found(const void *value)
{
	int hit = value != 0;

	asm volatile("" : "+r"(hit));
	return hit;
}"""
_SET_LOOKUP = {
    "number": """static __always_inline int in_number_set(void *set, __u32 value)
{
	return found(bpf_map_lookup_elem(set, &value));
}""",
    "address": """static __always_inline int in_address_set(void *set, const struct pkt *p, const __u32 *addr)
{
	struct bpfwall_addr_key key = {};

	key.family = p->family;
	key.prefixlen = ADDR_KEY_PREFIXLEN(p->family == 4 ? 32 : 128);
	__builtin_memcpy(key.addr, addr, 16);
	return found(bpf_map_lookup_elem(set, &key));
}""",
}


def _relation(left: str, op: str, right: str) -> str:
    """`left op right` in C; decided when both sides are the same ($a <= $a, dst_port == dst_port),
    which is what the user wrote and, left to clang, a self-comparison warning."""
    return _REFLEXIVE[op] if left == right else f"{left} {op} {right}"


def _contradict(terms: list[str]) -> bool:
    """Whether conjoined terms test one member of the packet for two values (tcp && udp): false,
    and left to clang an overlapping-comparison warning."""
    seen: dict[str, int] = {}
    for term in terms:
        member, value = _EXCLUSIVE.get(term, (None, None))
        if member is not None and seen.setdefault(member, value) != value:
            return True
    return False


def filter_c(expr, direction: str, interfaces=()) -> str:
    """The C condition for `expr` (None = no filter: pass) in `direction`; `interfaces`: the
    unit's interface names, in the order of their bits."""
    if expr is None:
        return "1"
    return _Emitter(direction, interfaces).cond(expr)


# The device's bits: looked up once per packet, by run() in port_filter.c.
_INTERFACES_OF = """static __always_inline __u64 interfaces_of(struct __sk_buff *skb)
{
	struct bpfwall_iface_key key = {};
	__u64 *bits;

	key.netns = bpf_get_netns_cookie(skb);
	key.ifindex = skb->ifindex;
	bits = bpf_map_lookup_elem(&%s, &key);
	return bits ? *bits : 0;
}""" % IFACES


def header(ingress, egress, params: list[str], sets: dict[str, str], meta_size: int,
           set_capacity: int, interfaces=()) -> str:
    """The whole bpfwall_filter.h for one unit's pair of checked expressions.

    `ingress`/`egress` are ASTs (or None), `params` the ordered param names,
    `sets` name → "number"|"address", `interfaces` the interface names (bit i = name i).
    """
    out = ["/* Generated by bpfwall from the checked AST. Do not edit. */",
           f"#define BPFWALL_META_SIZE {meta_size}",
           f"#define BPFWALL_HAS_PARAMS {1 if params else 0}",
           f"#define BPFWALL_HAS_IFNAME {1 if interfaces else 0}",
           "struct bpfwall_params {"]
    out += [f"\t__u64 {param_member(n)};" for n in params] or ["\t__u64 _unused;"]
    out.append("};")
    for name, kind in sorted(sets.items()):
        if kind == "number":
            out += ["struct {",
                    "\t__uint(type, BPF_MAP_TYPE_HASH);",
                    f"\t__uint(max_entries, {set_capacity});",
                    "\t__type(key, __u32);",
                    "\t__type(value, __u8);",
                    f"}} {set_map(name)} SEC(\".maps\");"]
        else:
            out += ["struct {",
                    "\t__uint(type, BPF_MAP_TYPE_LPM_TRIE);",
                    f"\t__uint(max_entries, {set_capacity});",
                    "\t__uint(map_flags, BPF_F_NO_PREALLOC);",
                    "\t__type(key, struct bpfwall_addr_key);",
                    "\t__type(value, __u8);",
                    f"}} {set_map(name)} SEC(\".maps\");"]
    if sets:
        out.append(_FOUND)
    out += [_SET_LOOKUP[kind] for kind in sorted(set(sets.values()))]
    if interfaces:
        out += ["struct {",
                "\t__uint(type, BPF_MAP_TYPE_HASH);",
                f"\t__uint(max_entries, {IFACES_CAPACITY});",
                "\t__uint(map_flags, BPF_F_NO_PREALLOC);",
                "\t__type(key, struct bpfwall_iface_key);",
                "\t__type(value, __u64);",
                f"}} {IFACES} SEC(\".maps\");",
                _INTERFACES_OF]
    for direction, expr in (("ingress", ingress), ("egress", egress)):
        out += [f"static __always_inline int bpfwall_filter_{direction}"
                "(const struct pkt *p, const struct bpfwall_params *prm)",
                "{",
                f"\treturn {filter_c(expr, direction, interfaces)};",
                "}"]
    return "\n".join(out) + "\n"

