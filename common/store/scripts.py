"""The Lua scripts in `lua/`, loaded by name, with their declared key lists checked on every call.

Why files: a script reads as Lua (with its header saying which KEYS and
ARGV it takes), the key-literal test can walk them, and redis-py caches
them by SHA as before. Each file starts with `-- KEYS: a, b, ...` (the keys
it takes, in order) and may `-- include: lib` (shared functions prepended).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from redis.commands.core import Script

LUA_DIR = Path(__file__).parent / "lua"
_HEADER = re.compile(r"^-- (KEYS|include):(.*(?:\n--   +.*)*)", re.MULTILINE)   # continuation lines are indented


@dataclass(frozen=True)
class ScriptSource:
    """A script's text (includes prepended) and the keys its header declares."""

    name: str
    text: str
    key_names: tuple[str, ...]


@functools.lru_cache(maxsize=None)
def read_script(name: str) -> ScriptSource:
    """Read `lua/{name}.lua`, prepend what it includes, and parse its KEYS header."""
    own = (LUA_DIR / f"{name}.lua").read_text()
    headers: dict[str, list[str]] = {"KEYS": [], "include": []}
    for field, value in _HEADER.findall(own):
        value = re.sub(r"\n--\s+", " ", value)
        headers[field] += [part.split()[0] for part in value.split(",") if part.strip()]   # "name (note)" -> name
    text = "".join((LUA_DIR / f"{lib}.lua").read_text() + "\n" for lib in headers["include"]) + own
    return ScriptSource(name, text, tuple(headers["KEYS"]))


class LuaScript:
    """A registered script: call it with as many keys as its header declares, in that order."""

    def __init__(self, client: redis.Redis, name: str):
        self.source = read_script(name)
        self.registered: Script = client.register_script(self.source.text)

    def __call__(self, keys: list[str], args: list[Any]) -> Any:
        self.check_keys(keys)
        return self.registered(keys=keys, args=args)

    def check_keys(self, keys: list[str]) -> None:
        """A caller passing another number of keys than the script declares is a bug, caught before Redis runs it."""
        if len(keys) != len(self.source.key_names):
            raise ValueError(f"script {self.source.name} takes KEYS {', '.join(self.source.key_names)}; "
                             f"got {len(keys)} keys")
