"""The state file of one bpfwall nft table: everything needed to rebuild it.

    {"version": 1, "table": "bpfwall", "units": {
        "nginx.service": {
            "ingress": "tcp && local_port == 80", "egress": null,   # normalized expressions
            "params": {"extra": 0}, "mode": "enforce",
            "sets": {"ports": {"kind": "number", "elements": ["80", "8000..8100"]}},
            "objects": {"chains": [...], "sets": [...], "counters": [...],  # rendered now
                        "rules": {chain: number of rules}},
            "attached": [{"cgroup": "system.slice/nginx.service", "level": 2, "id": 1234,
                          "directions": ["ingress"]}]}}}

It lives at `$BPFWALL_NFT_STATE_DIR/<table>.json` (default /run/bpfwall/nft), is
replaced atomically (write, then rename) and changed only under an exclusive
lock on `<table>.lock`, so the guard never restores a half-made change.
"""
from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager

from .errors import NftError

DEFAULT_STATE_DIR = "/run/bpfwall/nft"
VERSION = 1


def state_dir() -> str:
    return os.environ.get("BPFWALL_NFT_STATE_DIR") or DEFAULT_STATE_DIR


class StateFile:
    def __init__(self, table: str, directory: str | None = None):
        self.table = table
        self.dir = directory or state_dir()
        self.path = os.path.join(self.dir, f"{table}.json")
        self.lock_path = os.path.join(self.dir, f"{table}.lock")

    @contextmanager
    def locked(self):
        try:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise NftError(f"cannot use the state directory {self.dir}: {e.strerror}"
                           + (" (bpfwall needs root)" if os.geteuid() != 0 else "")) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def load(self) -> dict:
        try:
            with open(self.path) as f:
                state = json.load(f)
        except FileNotFoundError:
            return {"version": VERSION, "table": self.table, "units": {}}
        except (OSError, ValueError) as e:
            raise NftError(f"cannot read the state file {self.path}: {e}") from None
        if state.get("version") != VERSION:
            raise NftError(f"{self.path} has state version {state.get('version')}; this bpfwall writes {VERSION}")
        return state

    def save(self, state: dict) -> None:
        if not state["units"]:
            self.remove()
            return
        tmp = f"{self.path}.tmp{os.getpid()}"
        text = json.dumps(state, separators=(",", ":"))  # one C-encoder call; json.dump streams in Python
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.path)

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
