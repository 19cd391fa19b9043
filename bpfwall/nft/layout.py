"""The layout of a bpfwall table and the commands that build and change it.

    table inet <table>
      chain input  { hook input priority 0; jump input_level_3; jump input_level_2; jump input_level_1 }
      map ingress_level_N { type cgroupsv2 : verdict }     cgroup at depth N → goto unit chain
      chain input_level_N  { socket cgroupv2 level N vmap @ingress_level_N }
      chain output, map egress_level_N, chain output_level_N   the same on the output hook
      counter <unit>/in.pass, <unit>/in.drop, …              per unit and direction
      set <unit>/s.<name>.<key type>                         named sets (interval)
      chain <unit>/in, <unit>/in.1, …                        the unit's filter (see lower/nft.py)

One dispatch per direction, deepest level first: each level's chain does one socket lookup
and one map lookup; the first level whose map holds the socket's ancestor at that depth
sends the packet to that unit's chain, whose verdict (accept or drop: every unit chain ends
in one) ends the evaluation. A miss falls through to the next shallower level. So exactly
one entry judges a packet — the nearest one up the tree: a unit's own element beats the
default of a slice above it (policy/judge.py), never ANDed with it. A packet costs a socket
lookup and a map lookup per level in use, whatever the number of units. Levels and their
maps exist only while a unit is attached at that depth.

nft 1.0.6's JSON parser cannot express `socket cgroupv2` (it knows only the
transparent, mark and wildcard keys), so the one rule of each level's chain is
written in nft syntax from identifiers bpfwall made itself; everything else
(the dispatch's jumps included) is JSON.
"""
from __future__ import annotations

from . import expr as X
from .names import BASE_CHAINS, HOOKS, level_map
from .records import Objects

FAMILY = "inet"


def _obj(table: str, **fields) -> dict:
    return {"family": FAMILY, "table": table, **fields}


def add_table(table: str) -> dict:
    return {"add": {"table": {"family": FAMILY, "name": table}}}


def delete_table(table: str) -> dict:
    return {"delete": {"table": {"family": FAMILY, "name": table}}}


def dispatch_chain(direction: str) -> str:
    """The base chain of a direction: it jumps to the level chains, deepest first."""
    return BASE_CHAINS[direction]


def base_chain(direction: str, level: int) -> str:
    """The chain of one level (a regular chain the dispatch jumps to)."""
    return f"{BASE_CHAINS[direction]}_level_{level}"


def add_level(table: str, direction: str, level: int) -> list:
    """The map and the chain of a level (JSON); its one rule comes from level_rule_text."""
    return [
        {"add": {"map": _obj(table, name=level_map(direction, level), type="cgroupsv2", map="verdict")}},
        {"add": {"chain": _obj(table, name=base_chain(direction, level))}},
    ]


def add_dispatch(table: str, direction: str) -> dict:
    return {"add": {"chain": _obj(table, name=dispatch_chain(direction), type="filter", hook=HOOKS[direction],
                                  prio=0, policy="accept")}}


def dispatch(table: str, direction: str, levels) -> list:
    """The dispatch chain's rules for these levels (JSON), replacing what it held: deepest first."""
    chain = dispatch_chain(direction)
    return [{"flush": {"chain": _obj(table, name=chain)}}] + [
        {"add": {"rule": _obj(table, chain=chain, expr=[X.jump(base_chain(direction, level))])}}
        for level in sorted(levels, reverse=True)]


def level_rule_text(table: str, direction: str, level: int) -> str:
    """The one rule of a level's chain, idempotent (the chain is flushed first), in nft syntax."""
    chain = base_chain(direction, level)
    return (f"flush chain inet {table} {chain}\n"
            f"add rule inet {table} {chain} socket cgroupv2 level {level} vmap @{level_map(direction, level)}\n")


def level_text(table: str, direction: str, level: int) -> str:
    """Map, chain and rule of a level in one nft-syntax transaction (idempotent); the dispatch
    chain is made if missing, but jumps to the level only once dispatch() says so."""
    chain = base_chain(direction, level)
    return (f"add table inet {table}\n"
            f"add chain inet {table} {dispatch_chain(direction)} {{ type filter hook {HOOKS[direction]} "
            f"priority 0; policy accept; }}\n"
            f"add map inet {table} {level_map(direction, level)} {{ type cgroupsv2 : verdict; }}\n"
            f"add chain inet {table} {chain}\n" + level_rule_text(table, direction, level))


def remove_level(table: str, direction: str, level: int) -> list:
    """Delete a level's chain and map: after dispatch() stopped jumping to it."""
    return [{"delete": {"chain": _obj(table, name=base_chain(direction, level))}},
            {"delete": {"map": _obj(table, name=level_map(direction, level))}}]


# -- a strict slice default's hold ------------------------------------------------------------
#
# A strict slice default's entry chain starts with a jump to its held chain (JSON). The held
# chain holds one rule per level from 1 to one below the deepest cgroup it knows:
#     socket cgroupv2 level M != @known_<digest> counter name held_<dir>_<digest> drop
# so a packet whose socket has an ancestor (or itself) the watcher has not classified yet is
# dropped; a known one returns to the entry chain and the default judges it. Any cgroup not
# known has a shallowest unknown ancestor, whose parent is known, so one level below the
# deepest known cgroup is as deep as the rules need to look. The set holds the slices the unit
# sits on, their ancestors, and every cgroup the watcher classified below them.

def held_levels(known) -> list[int]:
    """The levels the held chain checks, from the known records (cgroup paths relative to the root)."""
    deepest = max((k.cgroup.count("/") + 1 for k in known), default=0)
    return list(range(1, deepest + 2))


def held_text(table: str, names, directions, levels) -> str:
    """The set, counters and held chains of a strict unit with their rules, in one nft-syntax
    transaction (idempotent: the chains are flushed first)."""
    out = [f"add table inet {table}\n", f"add set inet {table} {names.known_set()} {{ type cgroupsv2; }}\n"]
    for d in directions:
        chain, counter = names.held_chain(d), names.held_counter(d)
        out.append(f"add counter inet {table} {counter}\n")
        out.append(f"add chain inet {table} {chain}\n")
        out.append(f"flush chain inet {table} {chain}\n")
        out += [f"add rule inet {table} {chain} socket cgroupv2 level {m} != @{names.known_set()} "
                f"counter name {counter} drop\n" for m in levels]
    return "".join(out)


def remove_held(table: str, names, directions, with_set: bool = True) -> list:
    """Delete a strict unit's held chains and counters of these directions, and its set (JSON),
    after nothing jumps to them."""
    cmds = []
    for d in directions:
        cmds += [{"flush": {"chain": _obj(table, name=names.held_chain(d))}},
                 {"delete": {"chain": _obj(table, name=names.held_chain(d))}},
                 {"delete": {"counter": _obj(table, name=names.held_counter(d))}}]
    return cmds + ([{"delete": {"set": _obj(table, name=names.known_set())}}] if with_set else [])


def known_elements(table: str, names, paths, add: bool = True) -> dict:
    return {("add" if add else "delete"): {"element": _obj(table, name=names.known_set(), elem=list(paths))}}


def flush_known(table: str, names) -> dict:
    return {"flush": {"set": _obj(table, name=names.known_set())}}


def flush_map(table: str, direction: str, level: int) -> dict:
    return {"flush": {"map": _obj(table, name=level_map(direction, level))}}


def add_elements(table: str, direction: str, level: int, pairs) -> dict:
    """Map elements: (cgroup path relative to the cgroup2 root, unit entry chain)."""
    return {"add": {"element": _obj(table, name=level_map(direction, level),
                                    elem=[[path, X.goto(chain)] for path, chain in pairs])}}


def delete_elements(table: str, direction: str, level: int, paths) -> dict:
    return {"delete": {"element": _obj(table, name=level_map(direction, level), elem=list(paths))}}


# -- a unit's objects ------------------------------------------------------------

def render_unit(table: str, rendered: dict, old: Objects) -> list:
    """Commands that replace a unit's objects `old` (their names) with `rendered` ({"chains":
    {name: rules}, "sets": {name: (nft type, elements)}, "counters": [names]}) in one
    transaction. Counters that stay keep their values."""
    cmds = []
    old_chains, old_sets, old_counters = set(old.chains), set(old.sets), set(old.counters)
    for name in rendered["counters"]:
        if name not in old_counters:
            cmds.append({"add": {"counter": _obj(table, name=name)}})
    for name in old.chains:  # drop every old rule first: nothing refers to old objects then
        cmds.append({"flush": {"chain": _obj(table, name=name)}})
    for name in rendered["chains"]:
        if name not in old_chains:
            cmds.append({"add": {"chain": _obj(table, name=name)}})
    for name, (nft_type, elements) in rendered["sets"].items():
        if name in old_sets:
            cmds.append({"flush": {"set": _obj(table, name=name)}})
        else:
            cmds.append({"add": {"set": _obj(table, name=name, type=nft_type, flags=["interval"])}})
        if elements:
            cmds.append({"add": {"element": _obj(table, name=name, elem=elements)}})
    for name, rules in rendered["chains"].items():
        for rule in rules:
            cmds.append({"add": {"rule": _obj(table, chain=name, expr=rule)}})
    cmds.extend(remove_unit_objects(table, Objects(
        chains=[c for c in old.chains if c not in rendered["chains"]],
        sets=[s for s in old.sets if s not in rendered["sets"]],
        counters=[c for c in old.counters if c not in rendered["counters"]],
    ), flush=False))
    return cmds


def remove_unit_objects(table: str, objects: Objects, flush: bool = True) -> list:
    chains = objects.chains
    cmds = [{"flush": {"chain": _obj(table, name=c)}} for c in chains] if flush else []
    cmds += [{"delete": {"chain": _obj(table, name=c)}} for c in chains]
    cmds += [{"delete": {"set": _obj(table, name=s)}} for s in objects.sets]
    cmds += [{"delete": {"counter": _obj(table, name=c)}} for c in objects.counters]
    return cmds


def objects_of(rendered: dict) -> Objects:
    """What the state keeps of a rendering: object names, and each chain's rule count (the guard's
    deep check compares it with the live table, so a flushed chain is noticed)."""
    return Objects(list(rendered["chains"]), list(rendered["sets"]), list(rendered["counters"]),
                   {name: len(rules) for name, rules in rendered["chains"].items()})
