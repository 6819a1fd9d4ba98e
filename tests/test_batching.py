"""Cross-request batching: compatible jobs share one pipeline call and each still ends on its own.

In-process tests drive worker.generation.generate_batch on the tiny model;
the stack tests run a pool worker with worker.max_batch 8 and check what a
client sees: every job completes with its own images, a cancelled one alone
ends cancelled, each reports progress.
"""
from __future__ import annotations

import io
import time
import uuid

import numpy as np
import pytest
from PIL import Image

from common.catalog import find_model, list_loras
from common.errors import JobCancelled
from common.jobspec import JobSpec
from tests.helpers import fetch

BASE = dict(model="sdq-tiny", width=64, height=64, num_inference_steps=4, guidance_scale=7.5)


def spec(prompt: str, seed: int, **changes) -> JobSpec:
    return JobSpec(prompt=prompt, seed=seed, **{**BASE, **changes})


@pytest.fixture(scope="module")
def pipe(settings):
    from worker.registry import load_pipeline

    return load_pipeline(find_model(settings.models_dir, "sdq-tiny"), "cpu", None, "float32")


def solo(pipe, settings, job: JobSpec, init: Image.Image | None = None) -> list[np.ndarray]:
    from worker.generation import generate

    result = generate(pipe, job, init, list_loras(settings.lora_dir), lambda *a: a[-1])
    return [np.asarray(image, dtype=np.int16) for image in result.images]


def member(job: JobSpec, init: Image.Image | None = None, on_step=None):
    from worker.generation import BatchMember

    return BatchMember(job, init, on_step or (lambda step, total: None))


def assert_close(batched, alone) -> None:
    """Equal but for the ±1-level rounding that a different batch size causes."""
    assert len(batched) == len(alone)
    for a, b in zip(batched, alone):
        assert np.abs(np.asarray(a, dtype=np.int16) - b).max() <= 2


JOBS = [spec("a red fox", 1), spec("a lighthouse at dusk", 7, num_images=2, negative_prompt="blurry"),
        spec("a bowl of fruit", 42)]


def test_a_shared_call_gives_each_job_its_solo_images(pipe, settings):
    from worker.generation import generate_batch

    members = [member(job) for job in JOBS]
    generate_batch(pipe, members, list_loras(settings.lora_dir))
    for job, m in zip(JOBS, members):
        assert m.result.seeds == job.seeds and len(m.result.images) == job.num_images
        assert_close(m.result.images, solo(pipe, settings, job))


def test_img2img_jobs_share_a_call_with_their_own_init_images(pipe, settings):
    from worker.generation import generate_batch

    inits = [Image.new("RGB", (64, 64), "orange"), Image.new("RGB", (64, 64), "navy")]
    jobs = [spec("a cat", 3, init_image_key="a.png", strength=0.6), spec("a dog", 4, init_image_key="b.png",
                                                                          strength=0.6)]
    assert jobs[0].batch_key() == jobs[1].batch_key()
    members = [member(job, init) for job, init in zip(jobs, inits)]
    generate_batch(pipe, members, list_loras(settings.lora_dir))
    for job, init, m in zip(jobs, inits, members):
        assert_close(m.result.images, solo(pipe, settings, job, init))


def test_a_dropped_job_loses_its_images_and_the_others_go_on(pipe, settings):
    from worker.generation import generate_batch

    def cancel_at_step_two(step: int, total: int) -> None:
        if step >= 2:
            raise JobCancelled("second")

    dropped = []
    members = [member(JOBS[0]), member(JOBS[1], on_step=cancel_at_step_two), member(JOBS[2])]
    generate_batch(pipe, members, list_loras(settings.lora_dir), on_drop=dropped.append)
    assert dropped == [members[1]] and isinstance(members[1].dropped, JobCancelled) and members[1].result is None
    for index in (0, 2):
        assert_close(members[index].result.images, solo(pipe, settings, JOBS[index]))


def test_when_every_job_is_dropped_the_call_stops(pipe, settings):
    from worker.generation import generate_batch

    steps = []

    def cancel(step: int, total: int) -> None:
        steps.append(step)
        raise JobCancelled("all")

    with pytest.raises(JobCancelled):
        generate_batch(pipe, [member(JOBS[0], on_step=cancel), member(JOBS[2], on_step=cancel)],
                       list_loras(settings.lora_dir))
    assert steps == [1, 1]                    # each checked once, at the first step; nothing ran on


def test_out_of_memory_splits_the_call_and_carries_on(pipe, settings):
    from worker.generation import generate_batch

    class OutOfMemoryError(RuntimeError):     # what torch.cuda raises, recognised by name
        pass

    calls = []

    def no_room_above_two(images: int) -> None:
        calls.append(images)
        if images > 2:
            raise OutOfMemoryError("CUDA out of memory (injected)")

    members = [member(job) for job in JOBS]
    generate_batch(pipe, members, list_loras(settings.lora_dir), fault=no_room_above_two)
    assert calls == [4, 1, 3, 2, 1]            # 4 images fail; split: [1] then [2, 1] fails; split: [2], [1]
    for job, m in zip(JOBS, members):
        assert_close(m.result.images, solo(pipe, settings, job))


# --- through the real stack -------------------------------------------------------------------
@pytest.fixture
def waiting_pool(stack):
    """A pool of its own whose jobs wait until its worker (max_batch 8) starts, so it finds them together."""
    from tests.test_routing import PoolApi

    started = []

    def submit_then_start(bodies: list[dict]):
        api = PoolApi(stack, "batch-" + uuid.uuid4().hex[:6])
        ids = [api.submit(**body) for body in bodies]
        started.append(stack.start_worker(f"{api.queue}-w", "--pool", api.queue, wait=False,
                                          env={"SDQ_WORKER_MAX_BATCH": "8", "SDQ_WORKER_TORCH_THREADS": "1"}))
        return api, ids

    yield submit_then_start
    for service in started:
        service.stop()


def test_waiting_jobs_run_together_and_each_completes_with_its_own_images(waiting_pool, api, rds):
    from common.store import keys

    bodies = [{"prompt": "a red fox", "seed": 11, "negative_prompt": "rain"},
              {"prompt": "a harbour", "seed": 12, "num_images": 2, "negative_prompt": "blur"},
              {"prompt": "a forest", "seed": 13, "negative_prompt": "fog"}]
    pool, ids = waiting_pool(bodies)
    tasks = pool.wait_all(ids)
    assert [t["status"] for t in tasks] == ["completed"] * 3
    assert len({rds.hget(keys.TASK(i), "started_at") for i in ids}) == 1          # taken together, in one pick
    assert len({rds.hget(keys.TASK(i), "compute_seconds") for i in ids}) == 1     # one call's compute
    serving = [w for w in api.get("/health").json()["workers"] if pool.queue in w["queues"]]
    assert [w["max_batch"] for w in serving] == [8]
    for body, task in zip(bodies, tasks):                            # the same images a solo run gives
        alone = api.run(**{**body, "width": 64, "height": 64, "num_inference_steps": 2})
        urls = task["result_urls"] or [task["result_url"]]
        solo_urls = alone["result_urls"] or [alone["result_url"]]
        assert len(urls) == len(solo_urls) == body.get("num_images", 1)
        for url, solo_url in zip(urls, solo_urls):
            a = np.asarray(Image.open(io.BytesIO(fetch(url))), dtype=np.int16)
            b = np.asarray(Image.open(io.BytesIO(fetch(solo_url))), dtype=np.int16)
            assert np.abs(a - b).max() <= 2
        assert task["progress"]["step"] == task["progress"]["total"] > 0


def test_cancelling_one_job_of_a_shared_call_leaves_the_others_running(waiting_pool):
    slow = {"num_inference_steps": 150, "width": 192, "height": 192}
    pool, ids = waiting_pool([{"prompt": f"slow {n}", "seed": n, **slow} for n in range(3)])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        tasks = [pool.task(i) for i in ids]
        if all(t["status"] == "processing" and t["progress"]["step"] > 0 for t in tasks):
            break
        time.sleep(0.05)
    assert all(t["status"] == "processing" for t in tasks), tasks     # all three in one call, all progressing
    pool.cancel([ids[1]])
    finished = pool.wait_all(ids, timeout=300)
    assert [t["status"] for t in finished] == ["completed", "cancelled", "completed"]
    assert finished[0]["result_url"] and finished[1]["result_url"] is None


def test_a_drop_inside_a_split_half_leaves_the_other_half_running(pipe, settings):
    from worker.generation import generate_batch

    class OutOfMemoryError(RuntimeError):
        pass

    def no_room_above_two(images: int) -> None:
        if images > 2:
            raise OutOfMemoryError("CUDA out of memory (injected)")

    def cancel(step: int, total: int) -> None:
        raise JobCancelled("first")

    members = [member(JOBS[0], on_step=cancel), member(JOBS[1]), member(JOBS[2])]
    generate_batch(pipe, members, list_loras(settings.lora_dir), fault=no_room_above_two)
    assert isinstance(members[0].dropped, JobCancelled) and members[0].result is None
    for index in (1, 2):
        assert_close(members[index].result.images, solo(pipe, settings, JOBS[index]))


def test_a_job_too_big_alone_fails_by_itself(pipe, settings):
    from worker.generation import generate_batch

    class OutOfMemoryError(RuntimeError):
        pass

    def no_room_for_two(images: int) -> None:
        if images >= 2:
            raise OutOfMemoryError("CUDA out of memory (injected)")

    dropped = []
    members = [member(job) for job in JOBS]            # JOBS[1] has 2 images: it never fits
    generate_batch(pipe, members, list_loras(settings.lora_dir), on_drop=dropped.append, fault=no_room_for_two)
    assert dropped == [members[1]] and type(members[1].dropped).__name__ == "OutOfMemoryError"
    assert members[0].result and members[2].result


def test_empty_prompts_share_a_call(pipe, settings):
    from worker.generation import generate_batch

    jobs = [spec("", 21), spec("a cat", 22, negative_prompt="")]
    members = [member(job) for job in jobs]
    generate_batch(pipe, members, list_loras(settings.lora_dir))
    for job, m in zip(jobs, members):
        assert_close(m.result.images, solo(pipe, settings, job))


@pytest.mark.parametrize("model", ["sdq-tiny-xl", "sdq-tiny-sd3", "sdq-tiny-flux"])
def test_every_family_batches_compatible_jobs(settings, model):
    """Batching is the engine's, not SD 1.x's: SDXL, SD3 and Flux jobs share a call and get their solo images
    (Flux jobs carry no negative prompt: the API refuses one)."""
    from worker.generation import generate_batch
    from worker.registry import load_pipeline

    family_pipe = load_pipeline(find_model(settings.models_dir, model), "cpu", None, "float32")
    same = dict(model=model, width=64, height=64, num_inference_steps=2)
    groups = [[spec("a red fox", 1, **same), spec("a lighthouse", 7, num_images=2, **same)]]
    if model != "sdq-tiny-flux":
        groups.append([spec("a red fox", 1, negative_prompt="blurry", **same),
                       spec("a lighthouse", 7, negative_prompt="fog", **same)])
    for jobs in groups:
        assert len({job.batch_key() for job in jobs}) == 1
        members = [member(job) for job in jobs]
        generate_batch(family_pipe, members, list_loras(settings.lora_dir))
        for job, m in zip(jobs, members):
            assert_close(m.result.images, solo(family_pipe, settings, job))


def test_sdxl_jobs_with_and_without_a_negative_prompt_never_share_a_call():
    """SDXL encodes a missing negative prompt as zeros, not as "": mixing them would change images.
    SD 1.x encodes both as "", so its jobs still mix."""
    for family in ("sdxl", None):
        assert spec("a", 1, family=family).batch_key() != spec("a", 1, negative_prompt="fog", family=family).batch_key()
        assert spec("a", 1, family=family).batch_key() == spec("b", 2, negative_prompt="", family=family).batch_key()
    assert spec("a", 1, family="sd1").batch_key() == spec("a", 1, negative_prompt="fog", family="sd1").batch_key()
