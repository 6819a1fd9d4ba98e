"""The output stage (worker/outputs.py): in order, bounded, retried on Redis errors, and a crash ends the job failed."""
from __future__ import annotations

import threading
import uuid

import redis

from common.jobspec import JobSpec
from common.store import TaskStatus, TaskStore
from worker.outputs import OutputStage


def test_work_runs_in_order_and_the_stage_is_bounded():
    stage = OutputStage(depth=1)
    running, gate, queued, done = threading.Event(), threading.Event(), threading.Event(), []
    stage.submit("a", lambda: (running.set(), gate.wait(30), done.append("a")), lambda exc: None)
    assert running.wait(30)                                               # "a" holds the stage
    stage.submit("b", lambda: done.append("b"), lambda exc: None)        # waits in the queue: it is full now
    assert stage.full                    # so a third submit blocks: the GPU thread would wait here

    def third() -> None:
        stage.submit("c", lambda: done.append("c"), lambda exc: None)
        queued.set()

    threading.Thread(target=third).start()
    assert not queued.is_set() and done == []     # nothing ran while "a" holds the stage; c's submit is held
    gate.set()
    assert queued.wait(30) and stage.drain(30) and done == ["a", "b", "c"]


def test_a_redis_blip_is_retried_and_other_errors_end_the_job():
    stage = OutputStage(depth=1, retry_pause=0.01)
    tries, crashes = [], []

    def flaky():
        tries.append(1)
        if len(tries) < 3:
            raise redis.ConnectionError("Redis restarting")

    stage.submit("flaky", flaky, crashes.append)
    stage.submit("broken", lambda: 1 / 0, crashes.append)
    stage.submit("after", lambda: tries.append("after"), crashes.append)
    assert stage.drain(5)
    assert len(tries) == 4 and tries[-1] == "after"                     # retried twice, then the next job ran
    assert len(crashes) == 1 and isinstance(crashes[0], ZeroDivisionError)


def test_a_crash_in_the_stage_fails_the_job_and_never_completes_it(rds):
    store = TaskStore(rds, retention_seconds=120)
    queue = "unit-outputs-" + uuid.uuid4().hex[:6]
    task_id = str(uuid.uuid4())
    store.create(task_id, "owner-o", JobSpec(prompt="p", model="m", width=64, height=64, num_inference_steps=4,
                                             guidance_scale=7.5, seed=1), queue)
    store.pick(queue, "w", ["m"], 1, None)

    def upload_then_crash():
        raise RuntimeError("encoder crashed")   # before any finish: the job must not be completed

    stage = OutputStage(depth=1)
    stage.submit(task_id, upload_then_crash,
                 lambda exc: store.finish(task_id, 0, "w", TaskStatus.FAILED, error=f"output stage: {exc}"))
    assert stage.drain(5)
    task = store.get(task_id)
    assert task.status is TaskStatus.FAILED and task.error == "output stage: encoder crashed"
    assert task.result_keys == []


def test_a_failed_upload_leaves_no_partial_outputs(settings):
    """S3 refuses the third image (after boto3's retries): the two already written are deleted, the error
    propagates (the job fails cleanly). A fault hook: a real S3 cannot be made to fail on one object."""
    from types import SimpleNamespace

    from PIL import Image

    from common.errors import StorageError
    from common.storage import Storage
    from worker.generation import GenerationResult
    from worker.jobs import upload_images

    class FailsThirdPut(Storage):
        puts = 0

        def put(self, key, data, content_type, metadata=None):
            FailsThirdPut.puts += 1
            if FailsThirdPut.puts == 3:
                raise StorageError(f"upload of {key} failed: injected")
            super().put(key, data, content_type, metadata)

    storage = FailsThirdPut(settings)
    ctx = SimpleNamespace(storage=storage, settings=settings)
    task_id = str(uuid.uuid4())
    spec = JobSpec(prompt="p", model="sdq-tiny", width=8, height=8, num_inference_steps=1, guidance_scale=1.0,
                   seed=1, num_images=3)
    images = [Image.new("RGB", (8, 8), colour) for colour in ("red", "green", "blue")]
    result = GenerationResult(images=images, seeds=[1, 2, 3], scheduler="PNDMScheduler", strength=None)
    try:
        upload_images(ctx, task_id, spec, result)
    except StorageError:
        pass
    else:
        raise AssertionError("the injected failure did not propagate")
    assert not any(storage.exists(storage.output_key(task_id, n, "png")) for n in range(3))
