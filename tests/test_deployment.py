"""How sdqueue is deployed: docker-compose.yml (valid where a compose client
exists, shaped as documented) and the local stack's start-up guards."""
from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from common.settings import OPTIONS
from dev.localstack import (LOOPBACK, LocalStack, PortInUse, free_port, local_api_key, local_flower_password,
                               wait_for)

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = {"SDQ_API_KEYS": "k1", "MINIO_ROOT_PASSWORD": "minio-secret-1", "FLOWER_BASIC_AUTH": "admin:pw",
            "SDQ_CALLBACKS_SECRET": "whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQ=", "SDQ_METRICS_TOKEN": "metrics-token-1"}
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DEFAULTED = re.compile(r"\$\{[A-Z_]+:-([^}]*)\}")   # ${VAR:-default}
ENV = {**os.environ, **REQUIRED}
GPU_WORKERS = ("worker-gpu0", "worker-gpu1", "worker-train")     # every service that holds a GPU
DEFAULTS = {option.name: option.default for option in OPTIONS}


def compose_command() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def published_ports(service: dict) -> set[int]:
    """Host ports a service publishes, from short ("9000:9000") or long (rendered) syntax."""
    ports = set()
    for port in service.get("ports", []):
        if isinstance(port, dict):
            if port.get("published") not in (None, ""):
                ports.add(int(port["published"]))
        else:
            parts = str(port).split(":")
            if len(parts) > 1:
                ports.add(int(parts[-2]))
    return ports


def host_addresses(service: dict) -> set[str]:
    """Host addresses a service's ports are published on ("" = every interface); ${VAR:-default} as its default."""
    found = set()
    for port in service.get("ports", []):
        if isinstance(port, dict):
            found.add(port.get("host_ip", ""))
            continue
        parts = DEFAULTED.sub(lambda m: m.group(1), str(port)).split(":")
        found.add(parts[0] if len(parts) == 3 else "")
    return found


def assert_secure_shape(services: dict) -> None:
    """What the security review asked for, checked on raw and on rendered compose."""
    assert 9001 not in published_ports(services["minio"]) and 9000 in published_ports(services["minio"])
    assert host_addresses(services["flower"]) == {"127.0.0.1"}, "Flower is published on loopback only"
    for name, service in services.items():
        if name in GPU_WORKERS or name == "callbacks":
            assert not service.get("ports"), f"{name}'s metrics port (no auth) stays on the compose network"
    assert services["flower"]["build"] == services["api"]["build"]
    assert "SDQ_REDIS_URL" in " ".join(services["flower"]["command"])
    assert services["flower"]["environment"]["SDQ_REDIS_URL"] == services["api"]["environment"]["SDQ_REDIS_URL"]
    for name in GPU_WORKERS:
        assert services[name]["environment"]["SDQ_WORKER_DEVICE"] == "cuda"


def test_compose_config_is_valid():
    command = compose_command()
    if command is None:
        pytest.skip("no docker compose client on this machine")
    result = subprocess.run([*command, "config"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert_secure_shape(services)
    assert services["minio"]["environment"]["MINIO_ROOT_PASSWORD"] == REQUIRED["MINIO_ROOT_PASSWORD"]
    for name in REQUIRED:
        unset = {k: v for k, v in ENV.items() if k != name}
        refused = subprocess.run([*command, "config", "-q"], cwd=ROOT, env=unset, capture_output=True, text=True)
        assert refused.returncode != 0 and name in refused.stderr, f"compose must refuse to start without {name}"


def test_compose_has_the_production_shape():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "minio", "minio-init", "api", "worker-gpu0", "worker-gpu1", "callbacks", "flower"} <= set(services)
    assert "--appendonly" in services["redis"]["command"] and "everysec" in services["redis"]["command"]
    for i in (0, 1):
        devices = services[f"worker-gpu{i}"]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "device_ids": [str(i)], "capabilities": ["gpu"]}]
    assert "--basic-auth" in " ".join(services["flower"]["command"])
    assert_secure_shape(services)
    assert "--role" in services["callbacks"]["command"] and "callbacks" in services["callbacks"]["command"]
    for name in ("api.Dockerfile", "worker.Dockerfile"):
        assert (ROOT / "docker" / name).exists()


def pool_of(command: list[str]) -> str | None:
    """The --pool a worker command names, if any."""
    return command[command.index("--pool") + 1] if "--pool" in command else None


def test_the_training_worker_has_a_gpu_of_its_own_on_the_training_pool():
    """worker-train is a GPU worker like the others (image, env, device pinning, metrics) that consumes the
    training pool, the queue the API sends training jobs to, on a GPU no inference worker has."""
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    train, gpu0 = services["worker-train"], services["worker-gpu0"]
    assert pool_of(train["command"]) == DEFAULTS["training.queue"] != DEFAULTS["tasks.queue"]
    assert train["command"][:5] == ["python", "-m", "worker.main", "--role", "gpu"]
    assert "SDQ_TRAINING_QUEUE" not in train["environment"], "the API and the trainer must agree: x-sdq-env only"
    for key in ("build", "image", "volumes", "depends_on", "expose", "restart"):
        assert train[key] == gpu0[key], key
    assert {k: v for k, v in train["environment"].items() if k != "SDQ_WORKER_NAME"} == \
        {k: v for k, v in gpu0["environment"].items() if k != "SDQ_WORKER_NAME"}
    devices = {name: services[name]["deploy"]["resources"]["reservations"]["devices"] for name in GPU_WORKERS}
    assert devices["worker-train"] == [{"driver": "nvidia", "device_ids": ["2"], "capabilities": ["gpu"]}]
    ids = [i for name in GPU_WORKERS for d in devices[name] for i in d["device_ids"]]
    assert len(ids) == len(set(ids)), f"a GPU is shared between workers: {devices}"
    names = [services[name]["environment"]["SDQ_WORKER_NAME"] for name in GPU_WORKERS]
    assert len(names) == len(set(names))
    for name in GPU_WORKERS:
        assert pool_of(services[name].get("command") or []) in (None, DEFAULTS["training.queue"])
    assert services["worker-gpu0"].get("command") is None      # inference: the image's CMD, the default pool


def test_a_stopped_trainer_s_job_resumes_from_its_checkpoint_rather_than_being_waited_for():
    """A training job outlives any sensible stop grace period (training.time_limit is hours): the trainer is
    killed after its grace period and the job resumes from S3, so checkpoints must be on and a killed attempt
    must be resent, not failed."""
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    train = services["worker-train"]
    assert seconds(train["stop_grace_period"]) < DEFAULTS["training.time_limit"]
    assert seconds(train["stop_grace_period"]) < seconds(services["worker-gpu0"]["stop_grace_period"])
    assert DEFAULTS["training.checkpoint_every"] > 0 and DEFAULTS["tasks.max_attempts"] >= 2
    assert "SDQ_TRAINING_CHECKPOINT_EVERY" not in train["environment"]


def seconds(duration: str) -> int:
    """A compose duration ("11m", "30s", "2m30s") in seconds."""
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([hms])", duration))


def test_metrics_need_the_token_and_prometheus_sends_it():
    """Port 8000 is published, so /metrics requires SDQ_METRICS_TOKEN; Prometheus reads it from a compose secret."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    token = services["api"]["environment"]["SDQ_METRICS_TOKEN"]
    assert re.fullmatch(r"\$\{SDQ_METRICS_TOKEN:\?[^}]+\}", token), f"compose must refuse to start without it: {token}"
    assert compose["secrets"]["metrics_token"] == {"environment": "SDQ_METRICS_TOKEN"}
    assert "metrics_token" in services["prometheus"]["secrets"]
    jobs = {job["job_name"]: job for job in yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]}
    assert jobs["sdqueue-api"]["authorization"] == {"type": "Bearer", "credentials_file": "/run/secrets/metrics_token"}
    assert "authorization" not in jobs["sdqueue-worker"]                # the workers' port is internal and open
    for name in (*GPU_WORKERS, "callbacks"):
        assert services[name]["expose"] == ["9101"] == [services[name]["environment"]["SDQ_METRICS_WORKER_PORT"]]
    assert host_addresses(services["prometheus"]) == {"127.0.0.1"}


def test_flower_stays_on_loopback_unless_told():
    flower = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["flower"]
    assert flower["ports"] == ["${FLOWER_BIND:-127.0.0.1}:5555:5555"]
    assert host_addresses({"ports": ["9000:9000"]}) == {""} and host_addresses({"ports": ["127.0.0.1:1:1"]}) == {"127.0.0.1"}


def test_local_secrets_are_private_from_the_start(tmp_path):
    data_dir = tmp_path / "fresh-clone" / "data"          # does not exist yet
    password = local_flower_password(data_dir)
    key = local_api_key(data_dir)
    for name in ("flower_password", "api_key"):
        assert stat.S_IMODE((data_dir / name).stat().st_mode) == 0o600
    assert key.startswith("sdq-") and password
    assert local_api_key(data_dir) == key and local_flower_password(data_dir) == password


def test_a_taken_port_fails_at_once_naming_the_setting(tmp_path):
    stack = LocalStack(data_dir=tmp_path, redis_port=free_port(), s3_port=free_port(), api_port=free_port(),
                       flower_port=free_port(), api_keys=["k"], flower_password="pw")
    with socket.socket() as taken:
        taken.bind((LOOPBACK, stack.redis_port))
        taken.listen()
        with pytest.raises(PortInUse, match="SDQ_REDIS_URL"):
            stack.start_redis()
    assert "redis" not in stack.services


def test_wait_for_fails_when_the_process_exited_even_if_the_check_passes():
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait()
    with pytest.raises(RuntimeError, match="exit code 3"):
        wait_for(lambda: True, 5, "redis", proc)


@pytest.mark.parametrize("module", ["bench.overhead", "bench.ingest", "bench.training"])
def test_benchmarks_start_the_way_make_bench_runs_them(module):
    """`make bench` runs them as modules; a broken import would only show up there."""
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=root, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "usage" in out.stdout
