"""`make run` keeps its stack up: a killed GPU worker or API is restarted by the supervisor
(dev/supervisor.py), the job the worker held still completes, and SIGTERM leaves no process behind.

First the backoff itself, on stand-in services and a stand-in clock (no waiting). Then the real
thing: `python -m dev.localstack run` in a subprocess, on free ports in a temp dir, sharing nothing
with the session stack. Its deadlines are hang guards, not timing claims.
"""
from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis
import requests

from common.store import WorkerRegistry, keys
from dev.localstack import LOOPBACK, ROOT, Service, free_port, free_port_block
from dev.supervisor import Supervisor
from tests.conftest import KEY_A, STACK_ENV
from tests.helpers import SLOW_JOB, Api


class StandIns:
    """What the supervisor needs of a LocalStack (starts, start_again, a final stop), with commands for services."""

    def __init__(self, data_dir: Path, commands: dict[str, list[str] | None]):
        self.data_dir, self.commands = data_dir, commands
        self.services: dict[str, Service] = {}
        self.starts: dict[str, object] = {}
        self.lock, self.stopping = threading.Lock(), False

    def start(self, name: str) -> Service:
        self.starts[name] = lambda: self.start(name)
        if self.commands[name] is None:
            raise RuntimeError(f"cannot start {name}: port 1234 is already in use")
        svc = Service(name, self.commands[name], dict(os.environ), self.data_dir / "logs" / f"{name}.log")
        with self.lock:                  # as LocalStack.add: nothing starts once stop() began
            if self.stopping:
                raise RuntimeError("stopping")
            self.services[name] = svc
            return svc.start()

    def start_again(self, name: str):
        return self.starts[name]()

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
        for svc in self.services.values():
            svc.stop(timeout=5)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def exit_and_wait(sup: Supervisor, clock: Clock, name: str) -> float:
    """Let the service exit, have the supervisor notice; the wait it scheduled (and skip to its end)."""
    w = sup.watched[name]
    if w.starting is not None:
        w.starting.exception(10)     # wait for the restart to end, however it ended
    svc = sup.stack.services[name]
    svc.proc.wait(10)
    sup.check()
    wait = w.due - clock.now
    clock.now = w.due
    sup.check()                      # due: the restart starts
    return wait


def test_backoff_doubles_is_loud_in_a_crash_loop_and_starts_over_once_stable(tmp_path):
    stack = StandIns(tmp_path, {"flaky": ["sh", "-c", "echo boom: no model; exit 3"]})
    clock, out = Clock(), io.StringIO()
    sup = Supervisor(stack, out=out, clock=clock)
    stack.start("flaky")
    sup.check()
    try:
        assert [exit_and_wait(sup, clock, "flaky") for _ in range(7)] == [1, 2, 4, 8, 30, 30, 30]
        text = out.getvalue()
        log = tmp_path / "logs" / "flaky.log"
        assert f"flaky exited (exit code 3); restarting in 1 s; log: {log}" in text
        assert f"flaky failed to start (exit code 3: it exited at once); restarting in 2 s; log: {log}" in text
        assert text.count("KEEPS CRASHING") == 1            # loud once, then one line per exit
        assert text.count("still crash-looping") == 2
        assert "flaky KEEPS CRASHING: 5 exits within 60 s" in text and "  | boom: no model" in text

        stack.commands["flaky"] = ["sleep", "60"]        # fixed: now it stays up
        sup.watched["flaky"].starting.result(10)
        sup.check()
        assert "flaky is up again (pid" in out.getvalue()
        clock.now += 61
        stack.services["flaky"].signal(signal.SIGKILL)
        assert exit_and_wait(sup, clock, "flaky") == 1   # up 60 s: starts over, no longer a crash loop
        assert "flaky exited (exit code -9, SIGKILL); restarting in 1 s" in out.getvalue()
        assert not sup.watched["flaky"].looping
    finally:
        sup.stop()
    assert not stack.services["flaky"].alive()


def test_a_start_that_fails_before_its_process_is_retried(tmp_path):
    stack = StandIns(tmp_path, {"api": ["sleep", "60"]})
    clock, out = Clock(), io.StringIO()
    sup = Supervisor(stack, out=out, clock=clock)
    stack.start("api")
    sup.check()
    try:
        stack.commands["api"] = None                     # its port is taken now
        stack.services["api"].signal(signal.SIGKILL)
        assert [exit_and_wait(sup, clock, "api") for _ in range(2)] == [1, 2]
        sup.watched["api"].starting.exception(10)
        sup.check()
        assert "api failed to start (cannot start api: port 1234 is already in use); restarting in 4 s" \
            in out.getvalue()
    finally:
        sup.stop()


def running(task: dict) -> bool:
    return task["status"] == "processing" and task["progress"]["step"] > 0


def processes() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, process group) of every live (not zombie) process, from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                state, ppid, pgrp = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
            except (OSError, ValueError):
                continue
            if state not in ("Z", "X"):
                found[int(entry.name)] = (int(ppid), int(pgrp))
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def stack_processes(data_dir: Path, groups: set[int] = frozenset()) -> dict[int, str]:
    """pid -> command line of every live process of this stack: those in `groups` (each service runs in
    a process group of its own), and any with the stack's data dir in its environment (Redis rewrites
    its own, hence the groups)."""
    marker = f"SDQ_DATA_DIR={data_dir}".encode()
    found = {}
    for pid, (_ppid, pgrp) in processes().items():
        try:
            mine = pgrp in groups or marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if mine:
            found[pid] = cmdline(pid)
    return found


class Supervised:
    """The `run` subprocess, its output and its API."""

    def __init__(self, data_dir: Path, env: dict[str, str]):
        self.data_dir = data_dir
        self.out_path = data_dir / "run.out"
        self.env = env
        with open(self.out_path, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "dev.localstack", "run"], cwd=ROOT, env=env,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.api = Api(f"http://{LOOPBACK}:{env['SDQ_API_PORT']}", KEY_A)
        self.redis = redis.Redis.from_url(env["SDQ_REDIS_URL"], decode_responses=True)

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def wait_output(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.output())
            if found:
                return found
            assert self.proc.poll() is None, f"the stack exited ({self.proc.returncode}):\n{self.output()}"
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} after {timeout} s:\n{self.output()}")

    def children(self) -> dict[int, str]:
        """pid -> command line of each process `run` started (one per service)."""
        return {pid: cmdline(pid) for pid, (ppid, _) in processes().items() if ppid == self.proc.pid}

    def child(self, needle: str) -> int:
        """The pid of the service whose command line contains `needle`."""
        pids = [pid for pid, cmd in self.children().items() if needle in cmd]
        assert len(pids) == 1, (needle, self.children())
        return pids[0]

    def groups(self) -> set[int]:
        """The process groups of `run` and of every service."""
        table = processes()
        return {table[pid][1] for pid in [self.proc.pid, *self.children()] if pid in table}

    def kill_everything(self) -> None:
        """Teardown after a failed test: nothing of this stack may survive the module."""
        groups = self.groups()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for pid in stack_processes(self.data_dir, groups):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


@pytest.fixture(scope="module")
def supervised(tmp_path_factory):
    data = tmp_path_factory.mktemp("supervised")
    env = {**os.environ, **STACK_ENV, "SDQ_DATA_DIR": str(data), "PYTHONUNBUFFERED": "1",
           "SDQ_REDIS_URL": f"redis://{LOOPBACK}:{free_port()}/0",
           "SDQ_STORAGE_ENDPOINT_URL": f"http://{LOOPBACK}:{free_port_block()}",
           "SDQ_API_PORT": str(free_port()), "SDQ_FLOWER_PORT": str(free_port()),
           "SDQ_API_KEYS": KEY_A, "SDQ_FLOWER_PASSWORD": "pw"}
    stack = Supervised(data, env)
    try:
        stack.wait_output(r"sdqueue is running", timeout=180)
        yield stack
    finally:
        stack.kill_everything()


def test_a_killed_gpu_worker_is_restarted_and_its_job_completes(supervised):
    api = supervised.api
    metrics = supervised.wait_output(r"worker: (http://\S+/metrics)", timeout=5).group(1)
    api_master = supervised.child("gunicorn")
    task_id = api.submit(**SLOW_JOB, seed=11)
    api.wait_for(task_id, running, timeout=90)
    worker = supervised.child("--name worker@local")

    os.kill(worker, signal.SIGKILL)

    line = supervised.wait_output(r"worker exited \(exit code -9, SIGKILL\); restarting in [\d.]+ s; log: (\S+)",
                                  timeout=30)
    assert line.group(1) == str(supervised.data_dir / "logs" / "worker.log")
    # A hang guard, not a timing claim (bench/redelivery.py measures redelivery).
    done = api.wait(task_id, timeout=180)
    assert done["status"] == "completed", done
    assert supervised.redis.hget(keys.TASK(task_id), "attempt") == "1"      # redelivered once, then ran
    supervised.wait_output(r"worker is up again \(pid \d+\)", timeout=30)

    # The same worker again: same name and queue, same metrics port; a new process.
    restarted = supervised.child("--name worker@local")
    assert restarted != worker
    live = [w for w in WorkerRegistry(supervised.redis).live() if w.name == "worker@local"]
    assert [str(restarted) in w.id for w in live] == [True], live
    assert live[0].queues == ["gpu"]                          # tasks.queue
    assert requests.get(metrics, timeout=5).ok
    # The rest stayed up: the same API master served the whole time.
    assert supervised.child("gunicorn") == api_master
    assert "stopping" not in supervised.output()


def test_a_killed_api_comes_back(supervised):
    master = supervised.child("gunicorn")
    group = processes()[master][1]
    assert len([pid for pid, (_, pgrp) in processes().items() if pgrp == group]) == 3   # the master, 2 workers
    os.kill(master, signal.SIGKILL)

    supervised.wait_output(r"api exited \(exit code -9, SIGKILL\); restarting in [\d.]+ s; log: \S+api\.log",
                           timeout=30)
    supervised.wait_output(r"api is up again \(pid \d+\)", timeout=90)
    assert requests.get(supervised.api.base + "/health", timeout=10).status_code == 200
    assert supervised.child("gunicorn") != master
    # The old master's gunicorn workers did not outlive it.
    assert not [pid for pid, (_, pgrp) in processes().items() if pgrp == group]
    assert supervised.api.run()["status"] == "completed"


def test_sigterm_stops_every_process(supervised):
    groups = supervised.groups()
    before = stack_processes(supervised.data_dir, groups)
    # run itself, Redis, S3, the GPU, training and callback workers, the API (a master and 2 workers), Flower
    assert len(before) == 10, before
    supervised.proc.send_signal(signal.SIGTERM)
    assert supervised.proc.wait(90) == 0
    assert "stopping sdqueue" in supervised.output()
    deadline = time.monotonic() + 10    # a killed group's last processes may still be on their way out
    while stack_processes(supervised.data_dir, groups) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert stack_processes(supervised.data_dir, groups) == {}
