"""AST → C: the emitted conditions, and that every form compiles with clang (no root needed)."""
import shutil
import subprocess

import pytest

from bpfwall import build
from bpfwall.lang.checker import analyze
from bpfwall.lower.c import filter_c, header


def c_of(text, direction="ingress"):
    return filter_c(analyze(text).expr, direction)


def test_booleans_and_numbers():
    assert c_of("icmp || (udp && dst_port == 53)") == "(p->is_icmp || ((p->proto == 17) && ((__u64)p->dport == 53ULL)))"


def test_aliases_follow_direction():
    assert "p->dport" in c_of("local_port == 80", "ingress")
    assert "p->sport" in c_of("local_port == 80", "egress")
    assert "p->saddr" in c_of("local_addr == ::1", "egress")
    assert "p->daddr" in c_of("local_addr == ::1", "ingress")


def test_v4_network_mask():
    code = c_of("saddr in 10.0.0.0/8")
    assert code == "((p->family == 4) && (p->saddr[0] & bpf_htonl(0xff000000U)) == bpf_htonl(0x0a000000U))"


def test_v6_address_all_words_and_family():
    code = c_of("daddr == 2001:db8::1")
    assert "(p->family == 6)" in code
    assert code.count("p->daddr[") == 4
    assert "bpf_htonl(0x20010db8U)" in code and "bpf_htonl(0x00000001U)" in code


def test_not_equal_is_negated_equal():
    assert c_of("saddr != 10.0.0.1") == "!" + c_of("saddr == 10.0.0.1")


def test_zero_prefix_is_family_only():
    assert c_of("saddr in ::/0") == "(p->family == 6)"


def test_sets_and_params():
    code = c_of("dst_port in @web && saddr in @bad && len > $max")
    assert "in_number_set(&set_web, (__u32)(__u64)p->dport)" in code
    assert "in_address_set(&set_bad, p, p->saddr)" in code
    assert "prm->max" in code


def test_header_declares_params_and_sets():
    checked = analyze("dst_port == $int || dst_port in @web || saddr in @bad")
    h = header(checked.expr, None, ["int"], {"web": "number", "bad": "address"}, 256, 100)
    assert "__u64 int_;" in h  # C keyword mangled
    assert "BPF_MAP_TYPE_HASH" in h and "BPF_MAP_TYPE_LPM_TRIE" in h
    assert "} set_web SEC(\".maps\");" in h
    assert "bpfwall_filter_egress(const struct pkt *p, const struct bpfwall_params *prm)\n{\n\treturn 1;" in h


def test_set_lookups_only_for_the_kinds_used():
    def header_of(sets):
        return header(None, None, [], sets, 256, 100)
    assert "in_number_set" not in header_of({}) and "in_address_set" not in header_of({})
    assert "in_number_set(void" in header_of({"a": "number"}) and "in_address_set" not in header_of({"a": "number"})
    both = header_of({"a": "number", "b": "address", "c": "number"})
    assert both.count("int in_number_set(") == 1 and both.count("int in_address_set(") == 1


def test_comparisons_of_a_value_with_itself_are_decided():
    """What the user wrote, without the self-comparison clang warns about."""
    assert c_of("saddr == saddr") == "1" and c_of("daddr != daddr") == "!1"
    assert c_of("local_addr == daddr", "ingress") == "1"  # the same field, spelled two ways
    assert c_of("local_addr == daddr", "egress") != "1"
    assert [c_of(f"$a {op} $a") for op in ("==", "<=", ">=", "!=", "<", ">")] == ["(1)"] * 3 + ["(0)"] * 3
    assert c_of("dst_port == dst_port") == "(1)"
    assert c_of("$a in $b..$a") == "(prm->a >= prm->b && 1)"
    assert c_of("$a in {1, $a}") == "(prm->a == 1ULL || 1)"


def test_a_packet_has_one_family_and_one_protocol():
    assert c_of("tcp && udp") == "0" and c_of("udp && (tcp && dst_port == 53)") == "0"
    assert c_of("udp && (tcp || icmp)") == "((p->proto == 17) && ((p->proto == 6) || p->is_icmp))"
    assert c_of("ip && dst_port == 1 && ipv6") == "0" and c_of("saddr in ::/0 && daddr in 0.0.0.0/0") == "0"
    assert c_of("ip && ip && tcp") == "((p->family == 4) && (p->family == 4) && (p->proto == 6))"
    assert c_of("!tcp && udp") == "(!(p->proto == 6) && (p->proto == 17))"


def test_interfaces_are_bits_of_the_device():
    """Bit i is the unit's i-th interface name (sorted); user space sets the bits a device matches."""
    names = ["lo", "wg0", "wlan*"]
    assert filter_c(analyze('ifname == "wg0"').expr, "egress", names) == "((p->ifaces & 0x2ULL) != 0)"
    assert filter_c(analyze('ifname in {"wlan*", "lo"}').expr, "ingress", names) == "((p->ifaces & 0x5ULL) != 0)"
    assert filter_c(analyze('"wg0" != ifname').expr, "ingress", names) == "!((p->ifaces & 0x2ULL) != 0)"
    assert filter_c(analyze("ifname == ifname").expr, "ingress", names) == "1"
    checked = analyze('ifname in {"wlan*", "wg0"} || tcp')
    h = build.UnitProgram(checked, None).header()
    assert "#define BPFWALL_HAS_IFNAME 1" in h and '} ifaces SEC(".maps");' in h and "interfaces_of(" in h
    assert "#define BPFWALL_HAS_IFNAME 0" in build.UnitProgram(analyze("tcp"), None).header()
    assert build.UnitProgram(checked, analyze('ifname == "lo"')).interfaces == ["lo", "wg0", "wlan*"]


# Every form the language has, sets and params of both kinds, tautologies a user may write.
EXPRESSIONS = [
    "true", "false", "!tcp", "icmp || (udp && dst_port == 53) || (tcp && dst_port == 80)",
    "dst_port in 1000..2000 && src_port != 0", "dst_port in {80, 443, 8000..8100, $p}",
    "saddr in {10.0.0.0/8, 192.168.1.1, ::1, fe80::/10}", "saddr == daddr", "local_addr != remote_addr",
    "len >= $min && len <= $max", "icmp_type == 8 && icmp_code == 0", "daddr in @nets || remote_port in @ports",
    "not (ip and tcp) or ipv6", "$a < $b", "saddr in @only_addresses", "dst_port in @only_ports",
    "saddr == saddr || daddr != daddr", "dst_port == dst_port", "icmp_type <= 255 && dst_port >= 0",
    "len > 4294967295 || dst_port in 0..65535", "saddr in ::/0 && daddr in 0.0.0.0/0",
    "tcp && udp || ip && (ipv6)", "$a in $limit..$a || !($a == $a) || $a < $a", "$a in {1, $a}",
    'ifname in {"wg0", "wlan*"} || ifname != "lo" && remote_addr in {localhost, link-local}',
    "ifname == ifname || remote_addr in any",
]


@pytest.mark.skipif(shutil.which("clang") is None, reason="clang not installed")
@pytest.mark.parametrize("load_bytes_only", [False, True], ids=["direct", "load-bytes"])
@pytest.mark.parametrize("text", EXPRESSIONS)
def test_compiles_without_warnings(tmp_path, text, load_bytes_only):
    """port_filter.c with the generated header, compiled with bpfwall's own flags (-Wall, not -w)
    and -Werror: neither the hand-written nor the generated C has a warning."""
    checked = analyze(text)
    prog = build.UnitProgram(checked, checked, load_bytes_only=load_bytes_only)
    command = build.compile_command(prog, build.source_dir() / "port_filter.c", str(tmp_path), tmp_path / "o")
    assert "-Wall" in command and "-w" not in command
    (tmp_path / "bpfwall_filter.h").write_text(prog.header())
    src = build.source_dir() / "port_filter.c"
    proc = subprocess.run([*build.compile_command(prog, src, str(tmp_path), tmp_path / "o"), "-Werror"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
