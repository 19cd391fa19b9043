"""AST → the C of `bpfwall_filter.h`, included by bpf/port_filter.c.

Only the checked AST reaches this module, never expression text: identifiers
come from the language's own tables (fields), or are names the lexer limited to
[A-Za-z_][A-Za-z0-9_]* (params, sets); numbers and addresses are emitted as
integer constants.
"""
from __future__ import annotations

from ..lang import ast
from ..lang.fields import ADDR, field_type, resolve
from ..program_contract import set_map

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

_C_KEYWORDS = frozenset("""auto break case char const continue default do double else enum extern
float for goto if inline int long register restrict return short signed sizeof static struct
switch typedef union unsigned void volatile while _Bool _Complex _Imaginary""".split())


def param_member(name: str) -> str:
    """The member of struct bpfwall_params that holds $name (readable in map dumps)."""
    return name + "_" if name in _C_KEYWORDS else name


class _Emitter:
    def __init__(self, direction: str):
        self.direction = direction

    def cond(self, node) -> str:
        """A C expression that is non-zero when the boolean node holds."""
        if isinstance(node, ast.BoolConst):
            return "1" if node.value else "0"
        if isinstance(node, ast.Field):
            return _BOOL_C[self.field(node)]
        if isinstance(node, ast.Not):
            return f"!{self.cond(node.operand)}"
        if isinstance(node, ast.And):
            return "(" + " && ".join(self.cond(o) for o in node.operands) + ")"
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
        return f"({value} >= {self.number(rng.lo)} && {value} <= {self.number(rng.hi)})"

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
        return "(" + " && ".join(terms) + ")"

    def addr_equal(self, left, right) -> str:
        if isinstance(left, ast.AddrLit) and isinstance(right, ast.AddrLit):
            return "1" if left.net == right.net else "0"
        if isinstance(left, ast.AddrLit):
            left, right = right, left
        if isinstance(right, ast.AddrLit):
            return self.net_match(self.addr_words(left), right.net)
        # Two fields of one packet: same family by construction; IPv4 leaves words 1..3 zero.
        a, b = self.addr_words(left), self.addr_words(right)
        return "(" + " && ".join(f"{a}[{i}] == {b}[{i}]" for i in range(4)) + ")"

    # -- comparisons -----------------------------------------------------
    def compare(self, node: ast.Compare) -> str:
        if self.is_address(node.left) or self.is_address(node.right):
            eq = self.addr_equal(node.left, node.right)
            return eq if node.op == "==" else f"!{eq}"
        return f"({self.number(node.left)} {node.op} {self.number(node.right)})"

    def membership(self, node: ast.In) -> str:
        subject, box = node.subject, node.container
        if self.is_address(subject):
            if isinstance(box, ast.AddrLit):
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
                terms.append(f"{value} == {self.number(item)}")
        return "(" + " || ".join(terms) + ")"

    def addr_in(self, subject, item: ast.AddrLit) -> str:
        if isinstance(subject, ast.AddrLit):
            return "1" if subject.net.version == item.net.version and subject.net.subnet_of(item.net) else "0"
        return self.net_match(self.addr_words(subject), item.net)


def filter_c(expr, direction: str) -> str:
    """The C condition for `expr` (None = no filter: pass) in `direction`."""
    if expr is None:
        return "1"
    return _Emitter(direction).cond(expr)


def header(ingress, egress, params: list[str], sets: dict[str, str], meta_size: int,
           set_capacity: int) -> str:
    """The whole bpfwall_filter.h for one unit's pair of checked expressions.

    `ingress`/`egress` are ASTs (or None), `params` the ordered param names,
    `sets` name → "number"|"address".
    """
    out = ["/* Generated by bpfwall from the checked AST. Do not edit. */",
           f"#define BPFWALL_META_SIZE {meta_size}",
           f"#define BPFWALL_HAS_PARAMS {1 if params else 0}",
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
    for direction, expr in (("ingress", ingress), ("egress", egress)):
        out += [f"static __always_inline int bpfwall_filter_{direction}"
                "(const struct pkt *p, const struct bpfwall_params *prm)",
                "{",
                f"\treturn {filter_c(expr, direction)};",
                "}"]
    return "\n".join(out) + "\n"

