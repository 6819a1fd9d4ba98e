"""docker-compose.yml: valid where a compose client exists, and shaped as documented."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "SDQ_API_KEYS": "k1", "FLOWER_BASIC_AUTH": "admin:pw"}


def compose_command() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_config_is_valid():
    command = compose_command()
    if command is None:
        pytest.skip("no docker compose client on this machine")
    result = subprocess.run([*command, "config", "-q"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    unset = {k: v for k, v in ENV.items() if k != "SDQ_API_KEYS"}
    refused = subprocess.run([*command, "config", "-q"], cwd=ROOT, env=unset, capture_output=True, text=True)
    assert refused.returncode != 0 and "SDQ_API_KEYS" in refused.stderr


def test_compose_has_the_production_shape():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "minio", "minio-init", "api", "worker-gpu0", "worker-gpu1", "callbacks", "flower"} <= set(services)
    assert "--appendonly" in services["redis"]["command"] and "everysec" in services["redis"]["command"]
    for i in (0, 1):
        devices = services[f"worker-gpu{i}"]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "device_ids": [str(i)], "capabilities": ["gpu"]}]
    assert "--basic-auth" in " ".join(services["flower"]["command"])
    assert "--role" in services["callbacks"]["command"] and "callbacks" in services["callbacks"]["command"]
    for name in ("api.Dockerfile", "worker.Dockerfile"):
        assert (ROOT / "docker" / name).exists()
