"""The Redis layout stays legible: keys named once, scripts that never spell a key, docs that match.

No Redis needed: these read the Lua sources, common/store/keys.py and docs/architecture.md.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from common.store import keys
from common.store.scripts import LUA_DIR, read_script

ROOT = Path(__file__).resolve().parent.parent
STRING_LITERAL = re.compile(r"'((?:[^'\\]|\\.)*)'|\"((?:[^\"\\]|\\.)*)\"")
KEYS_INDEX = re.compile(r"KEYS\[(\d+)\]")


def script_names() -> list[str]:
    """Every script (not lib.lua, which only other scripts include)."""
    return sorted(p.stem for p in LUA_DIR.glob("*.lua") if p.stem != "lib")


def lua_code(text: str) -> str:
    """The Lua source without its comments (a comment may name a key to explain it)."""
    return "\n".join(line.split("--", 1)[0] for line in text.splitlines())


@pytest.mark.parametrize("path", sorted(LUA_DIR.glob("*.lua")), ids=lambda p: p.name)
def test_scripts_never_name_a_redis_key(path):
    """Every key a script touches arrives through KEYS; a literal would hide it from the key set."""
    for single, double in STRING_LITERAL.findall(lua_code(path.read_text())):
        literal = single or double
        assert ":" not in literal and not literal.startswith(keys.PREFIX), \
            f"{path.name}: the literal {literal!r} looks like a Redis key; pass it through KEYS"


@pytest.mark.parametrize("name", script_names())
def test_each_script_declares_exactly_the_keys_it_uses(name):
    source = read_script(name)
    own = lua_code((LUA_DIR / f"{name}.lua").read_text())
    assert source.key_names, f"{name}.lua has no '-- KEYS:' header"
    used = {int(n) for n in KEYS_INDEX.findall(own)}
    unpacked = "unpack(KEYS)" in own
    assert unpacked or used == set(range(1, len(source.key_names) + 1)), (name, used, source.key_names)
    if unpacked:   # `local a, b, c = unpack(KEYS)`: the names bound must be the header's, in order
        bound = re.search(r"local ([\w,\s]+?)\s*=\s*unpack\(KEYS\)", own).group(1)
        assert [n.strip() for n in bound.split(",")] == list(source.key_names), name


def test_a_call_with_another_key_set_is_refused_before_redis():
    import redis

    from common.store.scripts import LuaScript

    unreachable = redis.Redis(host="127.0.0.1", port=1)      # never contacted: the check comes first
    with pytest.raises(ValueError, match="takes KEYS task"):
        LuaScript(unreachable, "update")([keys.TASK("x"), "another"], ["f", "v"])


def test_every_key_is_named_once():
    patterns = [k.pattern for k in keys.ALL]
    assert len(patterns) == len(set(patterns))


def test_no_module_outside_the_store_spells_a_key():
    """api/, worker/ and the rest of common/ use keys.py (or a store); only the store package names keys."""
    offenders = []
    for folder in ("api", "worker", "common", "dev"):
        for path in (ROOT / folder).rglob("*.py"):
            if "store" in path.relative_to(ROOT).parts:
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if re.search(r"[\"']sdq:", code):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_no_code_outside_the_store_reaches_into_its_redis_client():
    offenders = [f"{p.relative_to(ROOT)}" for folder in ("api", "worker") for p in (ROOT / folder).rglob("*.py")
                 if re.search(r"store\.(redis|client)\b", p.read_text())]
    assert not offenders, offenders


def test_architecture_doc_carries_the_key_map_of_keys_py():
    """docs/architecture.md's table is `python -m common.store`'s output."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    block = re.search(r"<!-- keys:begin -->\n(.*?)<!-- keys:end -->", doc, re.S)
    assert block, "docs/architecture.md lacks the <!-- keys:begin --> ... <!-- keys:end --> block"
    assert block.group(1).strip() == keys.key_map_markdown().strip(), \
        "regenerate the key map: python -m common.store"
