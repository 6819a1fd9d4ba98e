"""Task-state transitions on a real Redis: atomic, forward-only, attempt-guarded."""
from __future__ import annotations

import time
import uuid

import pytest

from common.errors import JobCancelled, JobTimeLimit, StaleAttempt, TaskNotFound
from common.jobspec import JobSpec, LoraRef
from common.queue import BrokerMessage
from common.store import (CancelOutcome, NoPick, Picked, RequeueOutcome, RunningJob, TaskStatus, TaskStore,
                          WorkerInfo, WorkerRegistry, keys)
from worker.monitor import StepMonitor
from worker.watch import JobWatch


@pytest.fixture
def store(rds) -> TaskStore:
    return TaskStore(rds, retention_seconds=120)


@pytest.fixture
def queue() -> str:
    """A queue of the test's own, so a pick takes only the test's jobs."""
    return "unit-" + uuid.uuid4().hex[:8]


def spec() -> JobSpec:
    return JobSpec(prompt="p", model="m", width=64, height=64, num_inference_steps=4, guidance_scale=7.5, seed=1)


def new_task(store: TaskStore, owner: str = "owner-x", queue: str = "unit-queue") -> str:
    task_id = str(uuid.uuid4())
    store.create(task_id, owner, spec(), queue)
    return task_id


def take(store: TaskStore, queue: str, worker: str) -> Picked | NoPick:
    """What a worker's delivery does first: pick the best waiting job of the queue (affinity off)."""
    return store.pick(queue, worker, ["m"], 1, None)


def running_job(store: TaskStore, task_id: str) -> RunningJob:
    return next(job for job in store.running() if job.task_id == task_id)


def test_create_get_and_expiry(store, rds):
    task_id = new_task(store)
    task = store.get(task_id)
    assert task.status is TaskStatus.PENDING and task.attempt == 0 and task.spec == spec()
    assert 0 < rds.ttl(keys.TASK(task_id)) <= 120
    with pytest.raises(TaskNotFound):
        store.get("missing")
    with pytest.raises(TaskNotFound):
        store.get_owned(task_id, "someone-else")


def test_completed_never_goes_back(store, queue):
    task_id = new_task(store, queue=queue)
    assert take(store, queue, "w1") == Picked(task_id, 0, "m")
    assert store.finish(task_id, 0, "w1", TaskStatus.COMPLETED, result_keys=["k"])
    assert take(store, queue, "w1") is NoPick.EMPTY
    assert take(store, queue, "w2") is NoPick.EMPTY
    assert not store.finish(task_id, 0, "w1", TaskStatus.FAILED, error="late")
    assert store.request_cancel(store.get(task_id)) is CancelOutcome.COMPLETED
    task = store.get(task_id)
    assert task.status is TaskStatus.COMPLETED and task.result_keys == ["k"] and task.error is None


def test_a_running_job_is_not_taken_again(store, rds, queue):
    task_id = new_task(store, queue=queue)
    WorkerRegistry(rds).publish(WorkerInfo(id="live-1", name="w", device="cpu", queues=[]), ttl=5)
    assert take(store, queue, "live-1").task_id == task_id
    assert take(store, queue, "other") is NoPick.EMPTY        # a duplicate delivery while it runs
    assert store.get(task_id).worker == "live-1"


def test_requeue_from_dead_worker_makes_old_attempt_stale(store, rds, queue):
    task_id = new_task(store, queue=queue)
    assert take(store, queue, "dead-worker").task_id == task_id
    message = BrokerMessage("unit-requeue-list", "attempt-1")
    rds.delete("unit-requeue-list")
    rds.lpush("unit-requeue-list", "older-job")
    job = running_job(store, task_id)
    assert store.requeue(job, message, max_attempts=3).attempt == 1
    assert store.requeue(job, message, max_attempts=3).outcome is RequeueOutcome.TAKEN   # only one reaper wins
    assert rds.rpop("unit-requeue-list") == "attempt-1"           # BRPOP order: the rescued job runs next
    assert take(store, queue, "new-worker") == Picked(task_id, 1, "m")
    with pytest.raises(StaleAttempt):
        store.check_still_mine(task_id, 0, "dead-worker")
    with pytest.raises(StaleAttempt):
        store.check_still_mine(task_id, 1, "someone-else")       # same attempt, other worker
    store.check_still_mine(task_id, 1, "new-worker")
    assert not store.finish(task_id, 0, "dead-worker", TaskStatus.COMPLETED, result_keys=["old"])
    assert store.finish(task_id, 1, "new-worker", TaskStatus.COMPLETED, result_keys=["new"])
    assert store.get(task_id).result_keys == ["new"]


def test_cancel_pending_and_running(store, queue):
    pending = new_task(store, queue=queue)
    assert store.queue_position(store.get(pending)) is not None
    assert store.request_cancel(store.get(pending)) is CancelOutcome.CANCELLED
    assert take(store, queue, "w") is NoPick.EMPTY
    assert store.queue_position(store.get(pending)) is None
    running = new_task(store, queue=queue)
    take(store, queue, "w")
    assert store.request_cancel(store.get(running)) is CancelOutcome.CANCELLING
    with pytest.raises(JobCancelled):
        store.check_still_mine(running, 0, "w")


def test_queue_positions_follow_submission_order(store, queue):
    ids = [new_task(store, queue=queue) for _ in range(3)]
    positions = [store.queue_position(store.get(i)) for i in ids]
    assert positions == [1, 2, 3]
    assert take(store, queue, "w").task_id == ids[0]
    assert store.queue_position(store.get(ids[1])) == 1


def test_listing_drops_expired_tasks(store, rds):
    owner = f"owner-{uuid.uuid4().hex}"
    ids = [new_task(store, owner) for _ in range(3)]
    rds.delete(keys.TASK(ids[1]))
    tasks, total = store.list_owned(owner, 0, 10)
    assert [t.id for t in tasks] == [ids[2], ids[0]]
    assert store.list_owned(owner, 0, 10)[1] == 2


def test_dead_heartbeat_drops_out_of_live_workers(rds):
    workers = WorkerRegistry(rds)
    workers.publish(WorkerInfo(id="short-lived", name="w", device="cpu", queues=[]), ttl=0.2)
    assert "short-lived" in [w.id for w in workers.live()]
    time.sleep(0.4)
    assert "short-lived" not in [w.id for w in workers.live()]


def test_monitor_enforces_time_limit_and_reports_progress(store, queue):
    task_id = new_task(store, queue=queue)
    take(store, queue, "w")
    watch = JobWatch(store, "w", interval=0.05)          # polled by hand here; a thread in the worker
    monitor = StepMonitor(watch, task_id, 0, time_limit=60)
    monitor.on_step(3, 10)
    assert store.get(task_id).progress_step == 0         # the step itself writes nothing
    watch.poll_once()
    assert (store.get(task_id).progress_step, store.get(task_id).progress_total) == (3, 10)
    store.request_cancel(store.get(task_id))
    monitor.on_step(4, 10)                               # not seen yet: the watcher has not polled
    watch.poll_once()
    with pytest.raises(JobCancelled):
        monitor.on_step(5, 10)
    monitor.close()
    expired = StepMonitor(watch, task_id, 0, time_limit=1, started=time.monotonic() - 5)
    with pytest.raises(JobTimeLimit):
        expired.on_step(1, 10)


def test_the_watch_marks_a_job_another_attempt_took_as_stale(store, queue):
    task_id = new_task(store, queue=queue)
    take(store, queue, "dead")
    watch = JobWatch(store, "dead", interval=0.05)
    monitor = StepMonitor(watch, task_id, 0, time_limit=60)
    store.requeue(running_job(store, task_id), BrokerMessage("unit-requeue-list", "next"), 3)
    watch.poll_once()
    with pytest.raises(StaleAttempt):
        monitor.on_step(1, 4)


def test_create_never_overwrites_an_existing_task(store, queue):
    task_id = new_task(store, queue=queue)
    assert take(store, queue, "w").task_id == task_id
    assert not store.create(task_id, "owner-x", spec(), queue)       # e.g. a retried submission
    assert store.get(task_id).status is TaskStatus.PROCESSING


def test_create_survives_a_redis_connection_drop(store, rds):
    first = new_task(store)
    conn = store._thread_connection()
    conn.send_command("CLIENT", "ID")
    rds.client_kill_filter(_id=conn.read_response())                 # drop only the store's connection
    second = new_task(store)
    assert store.get(first).status is TaskStatus.PENDING and store.get(second).status is TaskStatus.PENDING
    rds.script_flush()                                              # and a flushed script cache
    assert store.get(new_task(store)).status is TaskStatus.PENDING


def test_job_that_kills_every_worker_is_failed_after_max_attempts(store, queue):
    task_id = new_task(store, queue=queue)
    message = BrokerMessage("unit-requeue-list", "next")
    for attempt in range(2):
        assert take(store, queue, f"doomed-{attempt}") == Picked(task_id, attempt, "m")
        requeued = store.requeue(running_job(store, task_id), message, max_attempts=3)
        assert requeued.outcome is RequeueOutcome.REQUEUED and requeued.attempt == attempt + 1
    assert take(store, queue, "doomed-2") == Picked(task_id, 2, "m")
    assert store.requeue(running_job(store, task_id), message, max_attempts=3).outcome is RequeueOutcome.FAILED
    task = store.get(task_id)
    assert task.status is TaskStatus.FAILED and "died 3 times" in task.error


def test_updates_never_resurrect_an_expired_task(store, rds):
    task_id = new_task(store)
    rds.delete(keys.TASK(task_id))
    assert not store.report_progress(task_id, 0, "w", 1, 4)
    store.set_fields(task_id, callback_status="late")
    assert not rds.exists(keys.TASK(task_id))
    rds.hset(keys.TASK(task_id), "progress_step", 1)                 # a partial hash is not a task
    with pytest.raises(TaskNotFound):
        store.get(task_id)


def queue_of_own(store: TaskStore, count: int) -> tuple[str, list[str]]:
    queue = "unit-pick-" + uuid.uuid4().hex[:6]
    ids = []
    for _ in range(count):
        ids.append(str(uuid.uuid4()))
        store.create(ids[-1], "owner-p", spec(), queue)
    return queue, ids


def test_a_repeated_delivery_gets_back_the_job_it_took(store):
    """A lost reply or a Celery retry asks again with the same delivery id: same job, nothing else taken."""
    queue, ids = queue_of_own(store, 2)
    first = store.pick(queue, "w", ["m"], 1, 10.0, delivery="d-1")
    assert first == Picked(ids[0], 0, "m")
    assert store.pick(queue, "w", ["m"], 1, 10.0, delivery="d-1") == first
    assert store.get(ids[1]).status is TaskStatus.PENDING
    assert store.pick(queue, "w2", ["m"], 1, 10.0, delivery="d-1").task_id == ids[1]   # another worker: not its job


def test_surplus_delivery_is_dropped_and_missing_one_waits(store, rds):
    queue, ids = queue_of_own(store, 1)
    workers = WorkerRegistry(rds)
    workers.publish(WorkerInfo(id="holder", name="holder", device="cpu", queues=[queue], models=["m"]), 30)
    assert store.pick(queue, "other", ["x"], 1, 60.0) is NoPick.WAIT    # its job waits for the holder; no spare
    rds.lpush(queue, "a-delivery")                                     # another delivery is queued for it
    assert store.pick(queue, "other", ["x"], 1, 60.0) is NoPick.EMPTY   # so this one is surplus: dropped
    rds.delete(queue)
    workers.remove("holder")


def test_stale_entries_are_dropped_from_every_index(store, rds):
    queue, ids = queue_of_own(store, 2)
    rds.delete(keys.TASK(ids[0]))                                      # expired while waiting
    assert store.pick(queue, "w", ["m"], 1, 10.0).task_id == ids[1]
    assert rds.zcard(f"sdq:pending:{queue}:m:m") == 0 and rds.zcard(f"sdq:pending:{queue}") == 0
    # The owner's index cannot know the hash is gone; an entry older than the retention is pruned at the
    # owner's next submission, so it never counts against the key's max_pending for long.
    rds.zadd("sdq:pending-owner:owner-p", {ids[0]: time.time() - 500})
    queue_of_own(store, 1)
    assert ids[0] not in rds.zrange("sdq:pending-owner:owner-p", 0, -1)


def test_cancel_of_a_requeued_job_is_immediate_and_requeue_honours_a_cancel(store, rds, queue):
    message = BrokerMessage("unit-requeue-list", "next")
    requeued = new_task(store, queue=queue)
    assert take(store, queue, "dead").task_id == requeued
    assert store.requeue(running_job(store, requeued), message, max_attempts=3).attempt == 1
    assert store.request_cancel(store.get(requeued)) is CancelOutcome.CANCELLED   # waiting again: cancelled at once
    assert rds.zscore(f"sdq:pending:{queue}", requeued) is None
    cancelled_while_running = new_task(store, queue=queue)
    assert take(store, queue, "dead").task_id == cancelled_while_running
    assert store.request_cancel(store.get(cancelled_while_running)) is CancelOutcome.CANCELLING
    outcome = store.requeue(running_job(store, cancelled_while_running), message, max_attempts=3).outcome
    assert outcome is RequeueOutcome.CANCELLED
    assert store.get(cancelled_while_running).status is TaskStatus.CANCELLED
    rds.delete("unit-requeue-list")


def test_every_key_a_pick_touches_stays_where_older_releases_put_it(store, rds, queue):
    """Redis data stay compatible: the key names of common/store/keys.py are the ones already in use."""
    task_id = new_task(store, owner="owner-compat", queue=queue)
    assert rds.zscore(f"sdq:pending:{queue}", task_id) is not None
    assert rds.zscore(f"sdq:pending:{queue}:m:m", task_id) is not None
    assert rds.zscore("sdq:pending-owner:owner-compat", task_id) is not None
    assert rds.zscore("sdq:owner:owner-compat", task_id) is not None
    assert take(store, queue, "w").task_id == task_id
    assert rds.zscore("sdq:running", task_id) is not None and rds.hget(f"sdq:task:{task_id}", "status") == "processing"


def test_requeue_puts_a_job_back_in_the_same_indexes_create_put_it_in(store, rds, queue):
    """Even with an empty model name and owner (indexed by create under keys ending in ':'), as before the regroup."""
    task_id = str(uuid.uuid4())
    store.create(task_id, "", JobSpec(prompt="p", model="", width=64, height=64, num_inference_steps=4,
                                      guidance_scale=7.5, seed=1), queue)
    indexes = [keys.PENDING(queue), keys.PENDING_MODEL(queue, ""), keys.PENDING_OWNER("")]
    assert all(rds.zscore(key, task_id) is not None for key in indexes)
    assert take(store, queue, "dead").task_id == task_id
    assert all(rds.zscore(key, task_id) is None for key in indexes)
    requeued = store.requeue(running_job(store, task_id), BrokerMessage("unit-requeue-list", "next"), 3)
    assert requeued.outcome is RequeueOutcome.REQUEUED
    assert all(rds.zscore(key, task_id) is not None for key in indexes)
    store.request_cancel(store.get(task_id))
    assert all(rds.zscore(key, task_id) is None for key in indexes)
    rds.delete("unit-requeue-list")


def test_a_pick_takes_companions_that_can_share_its_pipeline_call(store, rds, queue):
    """Same model and batch key, in the order workers take jobs, while their images fit in max_images."""
    def job(**changes) -> str:
        task_id = str(uuid.uuid4())
        store.create(task_id, "owner-b", JobSpec(**{**dict(prompt="p", model="m", width=64, height=64,
                                                            num_inference_steps=4, guidance_scale=7.5, seed=1),
                                                    **changes}), queue)
        return task_id

    first = job()
    other_size = job(width=128)
    two_images = job(num_images=2, prompt="another prompt", seed=9)
    too_many = job(num_images=4)
    with_negative = job(negative_prompt="blurry")   # SDXL encodes none as zeros: never mixed with jobs without
    third = job(prompt="a third prompt", seed=5)
    late = job()
    picked = store.pick(queue, "w", ["m"], 1, 10.0, delivery="batch-1", max_images=4)
    assert picked.task_id == first and [c.task_id for c in picked.companions] == [two_images, third]
    assert [c.task_id for c in picked.claims] == [first, two_images, third]
    for task_id in (first, two_images, third):
        task = store.get(task_id)
        assert task.status is TaskStatus.PROCESSING and task.worker == "w"
        assert rds.zscore(keys.PENDING(queue), task_id) is None and rds.zscore(keys.RUNNING(), task_id) is not None
        assert rds.zscore(keys.PENDING_OWNER("owner-b"), task_id) is None
    assert {store.get(t).status for t in (other_size, too_many, with_negative, late)} == {TaskStatus.PENDING}
    assert store.pick(queue, "w", ["m"], 1, 10.0, delivery="batch-1", max_images=4) == picked   # a retried delivery
    solo = store.pick(queue, "w2", ["m"], 1, 10.0, delivery="batch-2", max_images=1)
    assert solo.task_id == other_size and solo.companions == ()


def test_batch_keys_say_which_jobs_can_share_a_call():
    base = dict(prompt="p", model="m", width=64, height=64, num_inference_steps=4, guidance_scale=7.5, seed=1)
    key = JobSpec(**base).batch_key()
    assert key and JobSpec(**{**base, "prompt": "q", "seed": 7, "negative_prompt": "", "num_images": 3}).batch_key() == key
    for different in ({"width": 72}, {"num_inference_steps": 5}, {"guidance_scale": 5.0}, {"model": "x"},
                      {"negative_prompt": "n"}, {"refiner": "r", "refiner_switch": 0.8},
                      {"scheduler": "EulerDiscreteScheduler"}, {"loras": [LoraRef("a", 0.5)]},
                      {"init_image_key": "i.png", "strength": 0.5}):
        assert JobSpec(**{**base, **different}).batch_key() != key, different
    assert JobSpec(**{**base, "init_image_key": "i", "mask_image_key": "m"}).batch_key() == ""     # inpainting
    assert JobSpec(**{**base, "num_images": 4, "batch_size": 2}).batch_key() == ""                # two calls


def test_a_retried_delivery_gets_its_companions_back_after_its_first_job_ended(store, queue):
    ids = [new_task(store, queue=queue) for _ in range(3)]
    picked = store.pick(queue, "w", ["m"], 1, 10.0, delivery="batch-r", max_images=3)
    assert [c.task_id for c in picked.claims] == ids
    store.request_cancel(store.get(ids[0]))                          # flagged; the worker ends it cancelled
    assert store.finish(ids[0], 0, "w", TaskStatus.CANCELLED)
    again = store.pick(queue, "w", ["m"], 1, 10.0, delivery="batch-r", max_images=3)
    assert [c.task_id for c in again.claims] == ids[1:]             # still this worker's: not stranded


def test_a_late_progress_write_never_touches_a_job_that_ended(store, queue):
    task_id = new_task(store, queue=queue)
    take(store, queue, "w")
    assert store.report_progress(task_id, 0, "w", 2, 4)
    assert not store.report_progress(task_id, 0, "other", 3, 4)          # not that worker's
    assert store.finish(task_id, 0, "w", TaskStatus.COMPLETED, progress_step=4, progress_total=4)
    assert not store.report_progress(task_id, 0, "w", 3, 4)              # the poller's late snapshot
    task = store.get(task_id)
    assert (task.progress_step, task.progress_total) == (4, 4)


def test_the_eta_is_the_pace_since_the_attempt_s_first_step(store, queue, monkeypatch):
    """ETA = seconds per step since the first step this attempt reported × steps left (model loading is not a
    step); the clock is driven, not waited for."""
    clock = [1000.0]
    monkeypatch.setattr("common.store.tasks.time.time", lambda: clock[0])
    task_id = new_task(store, queue=queue)
    take(store, queue, "w")
    assert store.report_progress(task_id, 0, "w", 2, 20).eta == ""        # the first step: no pace yet
    clock[0] = 1004.0
    assert float(store.report_progress(task_id, 0, "w", 6, 20).eta) == 14.0   # 4 steps in 4 s, 14 left
    clock[0] = 1010.0
    assert float(store.report_progress(task_id, 0, "w", 8, 20).eta) == 20.0   # 6 steps in 10 s, 12 left
