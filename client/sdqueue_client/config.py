"""Where the CLI finds its URL and key: flags, then SDQ_URL / SDQ_API_KEY, then a config file, then defaults.

Why a file too: a key typed on every command ends up in the shell history. The
file is TOML (`url = "..."`, `key = "..."`, optionally `timeout`, `retries`,
`header`; top level or under `[sdq]`) or, named *.ini / *.cfg, INI with an
`[sdq]` section.
"""
from __future__ import annotations

import configparser
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from sdqueue_client.core import DEFAULT_TIMEOUT, DEFAULT_URL
from sdqueue_client.retry import DEFAULT_RETRIES

if sys.version_info >= (3, 11):
    import tomllib
else:                                   # pragma: no cover - the package depends on tomli there
    import tomli as tomllib

ENV_URL = "SDQ_URL"
ENV_KEY = "SDQ_API_KEY"
SECTION = "sdq"


class ConfigError(Exception):
    """The config file exists but cannot be read: a usage error (exit 2)."""


@dataclass
class Config:
    url: str = DEFAULT_URL
    key: Optional[str] = None
    timeout: float = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES
    header: str = "X-API-Key"
    source: Dict[str, str] = field(default_factory=dict)   # setting -> where it came from, for error messages


def default_path(env: Mapping[str, str] = os.environ) -> Path:
    """$XDG_CONFIG_HOME/sdq/config.toml, ~/.config/sdq/config.toml without it."""
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "sdq" / "config.toml"


def read_file(path: Path) -> Dict[str, Any]:
    """The settings of a config file ({} when it does not exist)."""
    if not path.exists():
        return {}
    try:
        if path.suffix.lower() in (".ini", ".cfg"):
            parser = configparser.ConfigParser()
            parser.read(path, encoding="utf-8")
            return dict(parser[SECTION]) if parser.has_section(SECTION) else {}
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except (OSError, configparser.Error, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    section = data.get(SECTION)
    return dict(section) if isinstance(section, dict) else data


def load(flags: Mapping[str, Any], env: Mapping[str, str] = os.environ, path: Optional[Path] = None) -> Config:
    """The settings in precedence order: flags > environment > file > defaults."""
    file_path = path or default_path(env)
    layers = [("file " + str(file_path), read_file(file_path)),
              ("environment", {"url": env.get(ENV_URL), "key": env.get(ENV_KEY)}),
              ("flags", dict(flags))]
    config = Config()
    for origin, values in layers:
        for name in ("url", "key", "timeout", "retries", "header"):
            if values.get(name) not in (None, ""):
                setattr(config, name, values[name])
                config.source[name] = origin
    try:
        config.timeout, config.retries = float(config.timeout), int(config.retries)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"timeout and retries must be numbers ({exc})") from exc
    return config
