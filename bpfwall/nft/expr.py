"""libnftables JSON building blocks, and their nft text for `explain`.

Only the small vocabulary the lowering uses is covered. Rules are lists of
these dicts: matches first, then statements (counter, verdict).
"""
from __future__ import annotations

import json


# -- expressions --------------------------------------------------------------

def meta(key: str) -> dict:
    return {"meta": {"key": key}}


def payload(protocol: str, field: str) -> dict:
    """A named header field (nft adds the protocol dependency itself)."""
    return {"payload": {"protocol": protocol, "field": field}}


def raw(base: str, offset: int, length: int) -> dict:
    """`@base,offset,length` (bits); base is "nh" or "th". No implicit dependency."""
    return {"payload": {"base": base, "offset": offset, "len": length}}


def shr(expr: dict, bits: int) -> dict:
    return {">>": [expr, bits]}


def band(expr: dict, mask: int) -> dict:
    return {"&": [expr, mask]}


def concat(*exprs) -> dict:
    return {"concat": list(exprs)}


def rng(lo, hi) -> dict:
    return {"range": [lo, hi]}


def prefix(addr: str, length: int) -> dict:
    return {"prefix": {"addr": addr, "len": length}}


def anon_set(elements: list) -> dict:
    return {"set": list(elements)}


def set_ref(name: str) -> str:
    return "@" + name


def match(left, right, op: str = "==") -> dict:
    return {"match": {"op": op, "left": left, "right": right}}


def intervals_value(intervals: list[tuple[int, int]]):
    """The right-hand side matching any value in sorted disjoint [lo, hi] intervals."""
    items = [lo if lo == hi else rng(lo, hi) for lo, hi in intervals]
    return items[0] if len(items) == 1 else anon_set(items)


# -- statements -----------------------------------------------------------------

def counter(name: str) -> dict:
    return {"counter": name}


def limit_over(rate: int, burst: int) -> dict:
    """Matches the packets over `rate`/second (a token bucket of `burst` packets)."""
    return {"limit": {"rate": rate, "burst": burst, "per": "second", "inv": True}}


def log_group(group: int, prefix: str) -> dict:
    """Hands the packet to nfnetlink_log group `group` (nft/nflog.py reads it)."""
    return {"log": {"prefix": prefix, "group": group}}


def goto(chain: str) -> dict:
    return {"goto": {"target": chain}}


def jump(chain: str) -> dict:
    return {"jump": {"target": chain}}


ACCEPT, DROP, RETURN = {"accept": None}, {"drop": None}, {"return": None}


def key(expr) -> str:
    """A canonical string of an expression, to deduplicate matches inside one rule."""
    return json.dumps(expr, sort_keys=True)


# -- nft text (explain) -------------------------------------------------------------

_SHOWN = 3
_OPS = {"==": "", "!=": "!= ", "<": "< ", "<=": "<= ", ">": "> ", ">=": ">= ", "in": ""}


def text(e) -> str:
    """nft syntax for an expression or statement built above."""
    if isinstance(e, bool):
        return str(e).lower()
    if isinstance(e, (int, str)):
        return str(e)
    (kind, body), = e.items()
    if kind == "meta":
        return f"meta {body['key']}"
    if kind == "payload":
        if "base" in body:
            return f"@{body['base']},{body['offset']},{body['len']}"
        return f"{body['protocol']} {body['field']}"
    if kind in (">>", "&"):
        return f"{text(body[0])} {kind} {text(body[1])}"
    if kind == "concat":
        return " . ".join(text(x) for x in body)
    if kind == "range":
        return f"{text(body[0])}-{text(body[1])}"
    if kind == "prefix":
        return f"{body['addr']}/{body['len']}"
    if kind == "set":
        items = [text(x) for x in body]
        if len(items) > _SHOWN + 2:  # the byte-relation sets: show their shape, not 256 pairs
            items = items[:_SHOWN] + [f"… {len(items) - _SHOWN - 1} more …", items[-1]]
        return "{ " + ", ".join(items) + " }"
    if kind == "match":
        right = body["right"]
        if body["left"] in (meta("iifname"), meta("oifname")):
            right = json.dumps(right)  # a device name is a string in nft: quoted
        return f"{text(body['left'])} {_OPS[body['op']]}{text(right)}"
    if kind == "counter":
        return f'counter name "{body}"'
    if kind == "limit":
        return f"limit rate over {body['rate']}/{body['per']} burst {body['burst']} packets"
    if kind == "log":
        return f'log prefix {json.dumps(body["prefix"])} group {body["group"]}'
    if kind in ("goto", "jump"):
        return f'{kind} "{body["target"]}"'
    if kind in ("accept", "drop", "return"):
        return kind
    raise ValueError(f"no nft text for {kind!r}")


def rule_text(rule: list) -> str:
    return " ".join(text(e) for e in rule)
