"""No stuck jobs: a job ends in a final state within tasks.time_limit + workers.watchdog_margin whatever its
worker does (dies, hangs in a call that never returns, or forgets it because Redis lost its finish), and no job
is run to completion twice by live workers."""
from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from common.queue import create_celery
from common.store import RequeueOutcome, TaskStatus, TaskStore, WorkerInfo, WorkerRegistry, keys
from common.store.results import RunningJob
from tests.helpers import wait_until
from tests.test_taskstore import new_task, running_job, take
from worker.jobs import JobContext
from worker.monitor import StepMonitor
from worker.outputs import OutputStage
from worker.reaper import ReaperRules, rescue, rescue_reason
from worker.watch import JobFlags, JobWatch
from worker.watchdog import EXIT_HUNG, Hung, Watchdog, WatchdogLimits, end_hung_jobs, find_hung

ROOT = Path(__file__).resolve().parents[1]
RULES = ReaperRules(heartbeat_ttl=4, time_limit=600, margin=60, max_attempts=3, callbacks_queue="callbacks")


@pytest.fixture
def store(rds) -> TaskStore:
    return TaskStore(rds, retention_seconds=120)


@pytest.fixture
def queue() -> str:
    return "watchdog-" + uuid.uuid4().hex[:8]


# --- the watchdog's verdicts -----------------------------------------------------------------
def flags(started: float, touched: float, setup: bool = False) -> JobFlags:
    return JobFlags("t", 0, started=started, touched=touched, setup=setup)


def test_a_job_past_its_limit_and_margin_is_overdue_even_while_loading():
    limits = WatchdogLimits(time_limit=100, margin=10, stall_timeout=30)
    assert find_hung([flags(0, 105)], limits, now=109) == []
    assert find_hung([flags(0, 105, setup=True)], limits, now=111) == [Hung("t", 0, True, 111)]


def test_a_job_without_a_step_for_the_stall_timeout_is_stalled_unless_it_is_setting_up():
    limits = WatchdogLimits(time_limit=100, margin=10, stall_timeout=30)
    assert find_hung([flags(0, 10)], limits, now=39) == []
    assert find_hung([flags(0, 10)], limits, now=41) == [Hung("t", 0, False, 31)]
    assert find_hung([flags(0, 10, setup=True)], limits, now=41) == []          # a model load makes no steps
    assert find_hung([flags(0, 10)], WatchdogLimits(100, 10, 0), now=99) == []   # stall_timeout 0: off


def test_steps_and_the_end_of_setup_count_as_progress(store, queue, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("worker.watch.time.monotonic", lambda: clock[0])   # the clock is driven, not waited for
    watch = JobWatch(store, "w", 1)
    monitor = StepMonitor(watch, new_task(store, queue=queue), 0, time_limit=600, started=950.0)
    assert monitor.flags.touched == monitor.flags.started == 950.0
    monitor.enter_setup()
    assert monitor.flags.setup
    clock[0] = 1010.0
    monitor.leave_setup()
    assert not monitor.flags.setup and monitor.flags.touched == 1010.0
    clock[0] = 1020.0
    monitor.on_step(1, 4)
    assert monitor.flags.touched == 1020.0 and monitor.flags.progress == (1, 4)
    monitor.close()


def test_the_watchdog_thread_reports_hung_jobs_once(store, queue):
    watch = JobWatch(store, "w", 1)
    now = [1000.0]
    seen = []
    dog = Watchdog(watch, WatchdogLimits(100, 10, 30), seen.append, interval=0.01, clock=lambda: now[0])
    monitor = StepMonitor(watch, new_task(store, queue=queue), 0, time_limit=100, started=990.0)
    assert dog.check_once() == []
    now[0] = 1025.0
    dog.start()
    dog.join(timeout=10)                 # it stops watching once it has reported
    assert not dog.is_alive()
    assert seen == [[Hung(monitor.flags.task_id, 0, False, 35.0)]]
    monitor.close()


# --- the reaper's rules ----------------------------------------------------------------------
def job(started: float, worker: str = "w1", task_id: str = "t1") -> RunningJob:
    return RunningJob(task_id, worker, 0, "q", "m", "o", "normal", started)


def worker(jobs: list[str] | None, last_seen: float) -> WorkerInfo:
    return WorkerInfo(id="w1", name="w", device="cpu", queues=["q"], jobs=jobs, last_seen=last_seen)


def test_the_reaper_rescues_jobs_of_gone_forgetful_and_hung_workers_only():
    now = 10_000.0
    assert rescue_reason(job(now - 5), None, RULES, now) == "gone"
    assert rescue_reason(job(now - 30), worker(["t1"], now), RULES, now) is None              # running it
    assert rescue_reason(job(now - 30), worker(["t2"], now), RULES, now) == "forgotten"       # busy with another
    assert rescue_reason(job(now - 30), worker([], now), RULES, now) == "forgotten"           # a lost finish
    assert rescue_reason(job(now - 2), worker([], now), RULES, now) is None     # just picked: not listed yet
    assert rescue_reason(job(now - 30), worker(None, now), RULES, now) is None  # an older worker lists nothing
    assert rescue_reason(job(now - 661), worker(["t1"], now), RULES, now) == "overdue"
    assert rescue_reason(job(now - 5, worker=""), None, RULES, now) is None     # requeued, waiting


def test_rescue_fails_an_overdue_job_and_a_late_finish_of_it_changes_nothing(store, queue, settings):
    from common.queue import MessageBuilder

    task_id = new_task(store, queue=queue)
    take(store, queue, "hung-worker")
    outcome = rescue(store, MessageBuilder(create_celery(settings)), running_job(store, task_id), RULES, "test",
                     give_up="job exceeded the time limit")
    assert outcome is RequeueOutcome.FAILED
    task = store.get(task_id)
    assert task.status is TaskStatus.FAILED and task.error == "job exceeded the time limit"
    assert not store.finish(task_id, 0, "hung-worker", TaskStatus.COMPLETED, result_keys=["x"], seeds=[1])
    assert store.get(task_id).status is TaskStatus.FAILED


def test_a_hung_worker_fails_its_overdue_job_resends_its_stalled_one_and_exits(store, rds, queue, settings):
    me = "hung@test:" + uuid.uuid4().hex[:6]
    info = WorkerInfo(id=me, name="hung@test", device="cpu", queues=[queue])
    workers = WorkerRegistry(rds)
    workers.publish(info, 60)
    overdue, stalled = new_task(store, queue=queue), new_task(store, queue=queue)
    assert take(store, queue, me).task_id == overdue
    assert take(store, queue, me).task_id == stalled
    ctx = JobContext(settings, store, workers, None, None, create_celery(settings), info, JobWatch(store, me, 1),
                     OutputStage())
    exits = []
    end_hung_jobs(ctx, [Hung(overdue, 0, True, 700), Hung(stalled, 0, False, 400)], exits.append)
    assert exits == [EXIT_HUNG]
    assert not workers.is_alive(me)                      # the reaper takes its other jobs at once
    failed = store.get(overdue)
    assert failed.status is TaskStatus.FAILED and "time limit" in failed.error
    resent = store.get(stalled)
    assert resent.status is TaskStatus.PROCESSING and resent.attempt == 1 and not rds.hget(keys.TASK(stalled), "worker")
    assert store.request_cancel(resent).value == "cancelled"      # waiting again; the test's queue has no worker


# --- through the real stack ------------------------------------------------------------------
def live_worker_id(rds, name: str = "worker@local") -> str:
    return next(w.id for w in WorkerRegistry(rds).live() if w.name == name)


def test_a_job_whose_finish_redis_lost_is_run_again_by_the_live_worker(api, rds):
    """A Redis restart can bring back a task as it was while its worker ran it: that worker is alive, so
    only its heartbeat's job list shows it no longer runs the task. The reaper resends it."""
    done = api.run(prompt="a lighthouse", width=64, height=64, num_inference_steps=2, seed=5)
    task_id, key = done["task_id"], keys.TASK(done["task_id"])
    me = live_worker_id(rds)
    started = time.time() - 30
    rds.hset(key, mapping={"status": "processing", "worker": me, "attempt": "0", "started_at": repr(started)})
    rds.hdel(key, "finished_at")
    rds.zadd(keys.RUNNING(), {task_id: started})
    again = api.wait(task_id, timeout=120)   # a hang guard, not a timing claim
    assert again["status"] == "completed", again
    assert rds.hget(key, "attempt") == "1" and rds.hget(key, "runs") == "2"
    assert again["seeds"] == done["seeds"]


def test_a_job_whose_live_worker_cannot_end_it_is_failed_past_the_limit(store, rds, queue, settings):
    """The worker's own watchdog failed to act (a process too wedged to run it, yet beating): the reaper
    fails the job once it has run past time_limit + margin."""
    fake = "wedged@test:" + uuid.uuid4().hex[:6]
    task_id = new_task(store, queue=queue)
    take(store, queue, fake)
    started = time.time() - settings.tasks.time_limit - settings.workers.watchdog_margin - 5
    rds.hset(keys.TASK(task_id), "started_at", repr(started))
    WorkerRegistry(rds).publish(WorkerInfo(id=fake, name="wedged@test", device="cpu", queues=[queue],
                                           jobs=[task_id]), 120)
    try:
        ended = wait_until(lambda: (task := store.get(task_id)).status is TaskStatus.FAILED and task, 60,
                           "the overdue job to fail")
        assert "time limit" in ended.error
    finally:
        WorkerRegistry(rds).remove(fake)


def test_a_job_its_live_worker_no_longer_lists_is_resent(store, rds, queue):
    fake = "busy@test:" + uuid.uuid4().hex[:6]
    task_id = new_task(store, queue=queue)
    take(store, queue, fake)
    rds.hset(keys.TASK(task_id), "started_at", repr(time.time() - 30))
    WorkerRegistry(rds).publish(WorkerInfo(id=fake, name="busy@test", device="cpu", queues=[queue],
                                           jobs=["another-task"]), 120)
    try:
        wait_until(lambda: store.get(task_id).attempt != 0, 60, "the job's next attempt")
        assert store.get(task_id).attempt == 1 and not rds.hget(keys.TASK(task_id), "worker")
    finally:
        WorkerRegistry(rds).remove(fake)
        store.request_cancel(store.get(task_id))


HANG_HOOK = """
import threading

import worker.registry as registry

_load = registry.load_pipeline


def load_pipeline(model, *args, **kwargs):
    if model.name.startswith("sdq-hang-"):
        threading.Event().wait()      # blocks forever, GIL released: a load from a dead network filesystem
    return _load(model, *args, **kwargs)


registry.load_pipeline = load_pipeline
"""


@pytest.fixture
def hanging_model(settings, tmp_path):
    """A copy of the tiny model whose load never returns, and the PYTHONPATH of a worker that hangs on it.

    The hang is put into the worker process from outside (a sitecustomize module the test writes), so no
    fault hook lives in the worker's code.
    """
    name = "sdq-hang-" + uuid.uuid4().hex[:6]
    folder = settings.models_dir / name
    shutil.copytree(settings.models_dir / "sdq-tiny", folder)
    (tmp_path / "sitecustomize.py").write_text(HANG_HOOK)
    yield name, str(tmp_path)
    shutil.rmtree(folder, ignore_errors=True)


def test_a_worker_hung_loading_a_model_fails_the_job_in_time_and_restarts(stack, hanging_model):
    from tests.test_routing import PoolApi

    model, hook_path = hanging_model
    api = PoolApi(stack, "hang-" + uuid.uuid4().hex[:6])
    service = stack.start_worker(f"{api.queue}-w", "--pool", api.queue, env={
        "PYTHONPATH": os.pathsep.join([hook_path, str(ROOT)]), "SDQ_MODELS_DEFAULT": "sdq-tiny",
        "SDQ_TASKS_TIME_LIMIT": "3", "SDQ_WORKERS_WATCHDOG_MARGIN": "2", "SDQ_WORKERS_STALL_TIMEOUT": "2"})
    try:
        task_id = api.submit(model=model, seed=1)
        task = api.wait_all([task_id], timeout=120)[0]   # a hang guard, not a timing claim
        assert task["status"] == "failed" and "time limit of 3 s" in task["error_message"], task
        assert service.proc.wait(60) == EXIT_HUNG        # it exits to be restarted (supervisor, compose, k8s)
        assert "restarting the worker" in service.log.read_text()
    finally:
        service.stop()


def test_a_heartbeat_rewritten_by_the_scheduler_keeps_its_lists():
    """pick.lua rewrites the heartbeat's models with cjson, which writes an empty list as {}."""
    from common.store.workers import worker_from_json

    info = worker_from_json('{"id": "w", "name": "w", "device": "cpu", "queues": ["q"], "jobs": {}, "speedups": {}}')
    assert info.jobs == [] and info.speedups == []


def test_a_training_job_s_own_limit_and_attempts_bound_it_instead_of_the_task_settings(store, queue, settings):
    """A training job runs for hours and resumes after each restart: the reaper reads its own time limit and
    attempts from its hash (JobSpec.time_limit / max_attempts), not tasks.time_limit / tasks.max_attempts."""
    from common.queue import MessageBuilder
    from tests.test_taskstore import spec

    task_id = str(uuid.uuid4())
    store.create(task_id, "owner-x", replace(spec(), time_limit=3600, max_attempts=5), queue)
    take(store, queue, "trainer-1")
    running = running_job(store, task_id)
    assert (running.time_limit, running.max_attempts) == (3600, 5)
    now = running.started_at
    assert rescue_reason(running, worker([task_id], now + 700), RULES, now + 700) is None     # past 600 + 60 s
    assert rescue_reason(running, worker([task_id], now + 3661), RULES, now + 3661) == "overdue"
    messages = MessageBuilder(create_celery(settings))
    for attempt in range(1, 5):                        # four deaths resend it (tasks.max_attempts would fail the 3rd)
        assert rescue(store, messages, running_job(store, task_id), RULES, "test") is RequeueOutcome.REQUEUED
        take(store, queue, f"trainer-{attempt + 1}")
    assert rescue(store, messages, running_job(store, task_id), RULES, "test") is RequeueOutcome.FAILED
    assert store.get(task_id).error == "the worker running this job died 5 times; giving up"
