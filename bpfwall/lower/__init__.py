"""Lowering: checked AST → C for bpf/port_filter.c (later: nft JSON)."""
