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
    assert c_of("saddr in ::/0") == "((p->family == 6))"


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


EXPRESSIONS = [
    "true", "false", "!tcp", "icmp || (udp && dst_port == 53) || (tcp && dst_port == 80)",
    "dst_port in 1000..2000 && src_port != 0", "dst_port in {80, 443, 8000..8100, $p}",
    "saddr in {10.0.0.0/8, 192.168.1.1, ::1, fe80::/10}", "saddr == daddr", "local_addr != remote_addr",
    "len >= $min && len <= $max", "icmp_type == 8 && icmp_code == 0", "daddr in @nets || remote_port in @ports",
    "not (ip and tcp) or ipv6", "$a < $b",
]


@pytest.mark.skipif(shutil.which("clang") is None, reason="clang not installed")
@pytest.mark.parametrize("text", EXPRESSIONS)
def test_compiles(tmp_path, text):
    checked = analyze(text)
    prog = build.UnitProgram(checked, checked)
    (tmp_path / "bpfwall_filter.h").write_text(prog.header())
    src = build.source_dir() / "port_filter.c"
    proc = subprocess.run(build.compile_command(prog, src, str(tmp_path), tmp_path / "o"), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
