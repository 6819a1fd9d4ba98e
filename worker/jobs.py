"""One job delivery, from claim to terminal status.

Why its own module: the Celery task body stays a two-line adapter, and the
rules live here: claim or skip, run, upload, finish; a model error fails
the job (the worker stays up), a cancel ends it `cancelled`, a stale
delivery writes nothing, and every ending notifies the webhook queue.
"""
from __future__ import annotations

import io
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery
from PIL import Image

from common.catalog import locate_model, worker_loras
from common.embeddings import list_embeddings
from common.errors import JobCancelled, JobHandedBack, JobTimeLimit, ModelError, StaleAttempt, StorageError, TaskNotFound
from common.infotext import VERSION, build_infotext
from common.sidecars import build_sidecar
from common.jobspec import JobSpec
from common.logs import log_context
from common.events import STEP_KINDS, started_data, wanted_events
from common.queue import GENERATE_TASK, hand_over_callback, send_event_callback
from common.storage import Storage, task_metadata
from common.store.checkpoints import CheckpointStore
from common.store import (Claim, ModelJob, NoPick, OwnedRecords, Task, TaskStatus, TaskStore, WorkerInfo, WorkerRegistry,
                          WorkerState)
from worker.assets import asset_dirs, ensure_assets, owned_budget
from worker.embeddings import sync_embeddings
from worker.generation import (DROPPING, BatchMember, GenerationResult, generate, generate_batch, is_out_of_memory,
                               release_memory)
from worker.images import CONTENT_TYPES, encode_image
from worker.ledger import Ledger
from worker.metrics import observe_job
from worker.monitor import StepMonitor
from worker.previews import Previewer, TaesdCache, preview_interval
from worker.outputs import OutputStage
from worker.watch import JobWatch
from worker.registry import PipelineRegistry

log = logging.getLogger("sdqueue.worker")


@dataclass
class JobContext:
    """Everything a worker process holds for its whole life."""

    settings: Any
    store: TaskStore
    workers: WorkerRegistry
    storage: Storage
    registry: PipelineRegistry
    celery: Celery
    info: WorkerInfo
    watch: JobWatch
    outputs: OutputStage
    max_batch: int = 1       # images one pipeline call may hold (worker.max_batch, resolved for the device)
    ledger: Ledger = field(default_factory=Ledger)
    taesd: TaesdCache | None = None   # TAESD preview decoders, when models/taesd holds any (worker/previews.py)
    checkpoints: CheckpointStore | None = None   # where a training job or a merge records the checkpoint it made
    stopping: threading.Event = field(default_factory=threading.Event)   # set by a warm shutdown (worker/main.py)
    model_jobs: OwnedRecords[ModelJob] | None = None   # the AWS extension's models (worker/modeljob.py)


def owed_tasks(ctx: JobContext) -> list[str]:
    """Every task this process owes an ending: picked and running, or its outputs still being written.

    The ledger is read first: a job enters the output stage before it leaves
    the ledger (never the other way), so a job missing from the first read is
    in the second, unless it has ended.
    """
    running = ctx.ledger.ids()
    return sorted({*running, *ctx.outputs.held()})


def describe_error(exc: BaseException) -> str:
    """A client-facing message; CUDA OOM is named as such."""
    name = type(exc).__name__
    if is_out_of_memory(exc):
        return f"CUDA out of memory: {str(exc).splitlines()[0] if str(exc) else 'reduce size or num_images'}"
    if isinstance(exc, (ModelError, JobTimeLimit)):
        return str(exc)
    if isinstance(exc, StorageError):
        return f"storage error: {exc}"
    return f"{name}: {exc}" if str(exc) else name


def load_input_image(storage: Storage, key: str | None) -> Image.Image | None:
    """An init image or mask the API stored for this job."""
    if not key:
        return None
    image = Image.open(io.BytesIO(storage.get(key)))
    image.load()
    return image


def output_key(ctx: JobContext, task_id: str, spec: JobSpec, index: int) -> str:
    """{prefix}/{task_id}/{n}.{ext}, or under the location a dialect promised its client."""
    if spec.output_prefix:
        return f"{spec.output_prefix.strip('/')}/{spec.output_stem or ''}{index}.{spec.extension}"
    return ctx.storage.output_key(task_id, index, spec.extension)


def copy_keys(ctx: JobContext, spec: JobSpec, seeds: list[int]) -> list[str]:
    """A1111's save_images names: {dir}/YYYY-MM-DD/NNNNN-SEED.ext, numbered on in that folder.

    The counter is one Redis increment per job, so workers on many hosts never
    hand out the same number.
    """
    folder = f"{spec.save_copy_dir.strip('/')}/{time.strftime('%Y-%m-%d')}"
    first = ctx.store.reserve_numbers(folder, len(seeds))
    return [f"{folder}/{first + i:05d}-{seed}.{spec.extension}" for i, seed in enumerate(seeds)]


def upload_images(ctx: JobContext, task_id: str, spec: JobSpec, result: GenerationResult) -> list[str]:
    """Encode each image with its infotext and put it at its output key (and its saved copy).

    All or nothing: when a put fails (after boto3's own retries), the
    objects this job already wrote are deleted before the error propagates,
    so a failed job leaves no partial outputs behind.
    """
    keys: list[str] = []
    written: list[str] = []
    ext = spec.extension
    copies = copy_keys(ctx, spec, result.seeds) if spec.save_copy_dir else [None] * len(result.images)
    try:
        for n, (image, seed, copy) in enumerate(zip(result.images, result.seeds, copies)):
            text = build_infotext(spec, seed, image.width, image.height, result.scheduler, VERSION)
            data = encode_image(image, ext, text, ctx.settings.worker.png_level)
            metadata = {"seed": str(seed), **task_metadata(task_id)}
            key = output_key(ctx, task_id, spec, n)
            for target in (key, copy) if copy else (key,):
                ctx.storage.put(target, data, CONTENT_TYPES[ext], metadata=metadata)
                written.append(target)
            keys.append(key)
    except Exception:
        remove_partial_outputs(ctx, task_id, written)
        raise
    return keys


def remove_partial_outputs(ctx: JobContext, task_id: str, written: list[str]) -> None:
    """Best effort: the failed job's objects go; if S3 refuses that too, they are logged for the operator."""
    if not written:
        return
    try:
        ctx.storage.delete(written)
    except Exception:  # noqa: BLE001 - the upload's own error is the one to report
        log.warning("task %s: could not delete its partial outputs %s", task_id, written)


def write_sidecar(ctx: JobContext, task: Task, status: TaskStatus, fields: dict) -> None:
    """The JSON a dialect promised next to the images, written before the status turns terminal.

    A failure here is logged, never turned into a job failure: the images are there.
    """
    urls = [ctx.storage.s3_uri(key) for key in fields.get("result_keys", [])]
    error = None if status is TaskStatus.COMPLETED else fields.get("error") or status.value
    try:
        document = build_sidecar(task.spec, task.id, fields.get("seeds") or [], urls, error)
        ctx.storage.put(task.spec.sidecar_key, json.dumps(document, ensure_ascii=False).encode(), "application/json",
                        metadata=task_metadata(task.id))   # the task's owner alone may read it (EKS image_link)
    except Exception:  # noqa: BLE001 - the job's own outcome must still be recorded
        log.exception("could not write %s for task %s", task.spec.sidecar_key, task.id)


def announce(ctx: JobContext) -> None:
    """Publish the heartbeat now, so health and `loaded` reflect a change at once."""
    try:
        ctx.info.jobs = owed_tasks(ctx)
        ctx.workers.publish(ctx.info, ctx.settings.workers.heartbeat_ttl)
    except Exception:  # the heartbeat thread will retry; a job must not fail for this
        log.exception("could not publish heartbeat")


def affinity_wait(settings) -> float | None:
    """routing.affinity_wait, or None when affinity is off (plain priority + arrival order)."""
    return settings.routing.affinity_wait if settings.routing.affinity else None


def run_delivery(ctx: JobContext, hint_id: str, hint_attempt: int, queue: str, delivery: str = "") -> str:
    """Process one delivery: take the best pending job of `queue` for this worker and run it.

    Why deliveries are interchangeable: every pending job put one message on
    the queue, but which job a free worker should run depends on what it holds
    warm and on priorities that may have changed since (TaskStore.pick). So a
    delivery is a wake-up: the job run may not be the one its arguments name
    (`hint_id`, kept for Flower and logs). A worker that finds only jobs left
    for others hands its delivery back to the queue, so none is lost.
    `delivery`: Celery's message id; a retried delivery gets back the job it took.
    """
    picked = ctx.store.pick(queue, ctx.info.id, ctx.registry.names(), ctx.registry.capacity,
                            affinity_wait(ctx.settings), delivery, max_images=ctx.max_batch)
    if picked is NoPick.WAIT:
        hand_back(ctx, hint_id, hint_attempt, queue)
        return "waiting"
    if picked is NoPick.EMPTY:
        log.info("delivery for %s found nothing pending in %s", hint_id, queue)
        return picked.value
    if picked.model:
        ctx.info.models = ctx.registry.names_after(picked.model)   # as pick() announced
    with ctx.ledger.holding(claim.task_id for claim in picked.claims):
        if picked.companions:
            return run_batch(ctx, picked.claims)
        return run_job(ctx, picked.task_id, picked.attempt)


def hand_back(ctx: JobContext, hint_id: str, hint_attempt: int, queue: str) -> None:
    """Put a delivery back at the end of the queue, then pause before looking again."""
    ctx.celery.send_task(GENERATE_TASK, args=[hint_id, hint_attempt], queue=queue)
    time.sleep(ctx.settings.routing.poll_interval)


def run_job(ctx: JobContext, task_id: str, attempt: int) -> str:
    """Run a job this worker has claimed; returns the outcome for logs and tests."""
    task = ctx.store.get(task_id)
    with log_context(task_id=task_id, model=task.spec.model):
        return run_claimed(ctx, task, attempt)


def run_claimed(ctx: JobContext, task: Task, attempt: int) -> str:
    task_id = task.id
    ctx.info.state, ctx.info.task_id = WorkerState.BUSY, task_id
    announce(ctx)
    try:
        outcome = execute(ctx, task, attempt)
    except JobHandedBack as exc:
        log.warning("task %s handed back (%s); the reaper resends it once this worker is gone", task_id, exc)
        return "handed back"
    except StaleAttempt:
        log.warning("task %s moved on to a newer attempt; dropping attempt %d", task_id, attempt)
        return "stale"
    finally:
        ctx.info.state, ctx.info.task_id = WorkerState.READY, None
        ctx.info.models, ctx.info.model_loads = ctx.registry.names(), ctx.registry.loads
        announce(ctx)
    if isinstance(outcome, Generated):
        hand_to_outputs(ctx, task, attempt, outcome)
        return "generated"
    return conclude(ctx, task, attempt, *outcome)


@dataclass
class Generated:
    """A job's images, made; encoding, uploads and the finish are left for the output stage."""

    result: GenerationResult
    compute: float
    steps: int


def hand_to_outputs(ctx: JobContext, task: Task, attempt: int, generated: Generated) -> None:
    """Queue the job's outputs on the output stage (worker/outputs.py); the GPU goes on with the next job."""
    state: dict[str, Any] = {}

    def on_crash(exc: BaseException) -> None:
        if "ended" not in state:               # never rewrite a job that already ended
            conclude(ctx, task, attempt, TaskStatus.FAILED, {"error": f"output stage: {describe_error(exc)}"})

    ctx.outputs.submit(task.id, lambda: deliver_outputs(ctx, task, attempt, generated, state), on_crash)


def deliver_outputs(ctx: JobContext, task: Task, attempt: int, generated: Generated, state: dict) -> None:
    """Encode and upload the images once, then finish the job completed; an upload error fails it instead.

    `state` survives the stage's retries after a Redis error: the uploads (and
    their A1111 file numbers) are not made twice, only the finish is retried.
    """
    result = generated.result
    if "keys" not in state:
        try:
            state["keys"] = upload_images(ctx, task.id, task.spec, result)
        except redis.RedisError:
            raise                              # the stage retries
        except Exception as exc:  # noqa: BLE001 - a storage failure fails this job only
            log.exception("task %s failed", task.id)
            conclude(ctx, task, attempt, TaskStatus.FAILED, {"error": describe_error(exc)})
            state["ended"] = True
            return
    conclude(ctx, task, attempt, TaskStatus.COMPLETED, {
        "result_keys": state["keys"], "seeds": result.seeds, "compute_seconds": f"{generated.compute:.6f}",
        "progress_step": generated.steps, "progress_total": generated.steps, "scheduler_used": result.scheduler,
    })
    state["ended"] = True


def conclude(ctx: JobContext, task: Task, attempt: int, status: TaskStatus, fields: dict) -> str:
    """A job's ending, once it is known: its sidecar, the terminal status, metrics and its callback."""
    me, task_id = ctx.info.id, task.id
    if task.spec.sidecar_key:
        write_sidecar(ctx, task, status, fields)
    if ctx.store.finish(task_id, attempt, me, status, **fields):
        log.info("task %s %s", task_id, status.value)
        started = task.started_at or time.time()
        observe_job(task.spec.model, status.value, started - task.created_at, time.time() - started,
                    fields.get("progress_step", 0))
        if task.spec.callback_url:   # owed since the finish (its outbox entry); a failed enqueue is resent
            hand_over_callback(ctx.celery, ctx.store, task_id, ctx.settings.callbacks.queue)
        return status.value
    return "stale"


def warm_pipeline(ctx: JobContext, model: str, assets: list[dict[str, str]], monitors: list[StepMonitor],
                  keep: tuple[str, ...] = ()) -> Any:
    """Fetch the jobs' uploaded files, then the warm pipeline of their model (loaded if need be), its
    embeddings in step with the embeddings folder (a stat per file when nothing changed).

    All count towards the jobs' time limits; none makes steps, so the
    watchdog bounds them by the time limit only, not by worker.stall_timeout.
    """
    for monitor in monitors:
        monitor.enter_setup()
    try:
        ensure_assets(ctx.storage, assets, asset_dirs(ctx.settings), owned_budget(ctx.settings),
                      keep=ctx.registry.names())
        if locate_model(ctx.settings.models_dir, model, ctx.settings.models.overrides) is None:
            raise ModelError(f"model '{model}' is not in the model directory")
        base = ctx.registry.get(model, keep)
        sync_embeddings(base, list_embeddings(ctx.settings.embeddings_dir))
    finally:
        for monitor in monitors:
            monitor.leave_setup()
    ctx.info.models = ctx.registry.names()
    return base


def warm_controlnets(ctx: JobContext, base: Any, spec: JobSpec, monitor: StepMonitor) -> tuple[list, list]:
    """The job's ControlNet models (kept warm with `base`) and each unit's stored control image (None: the unit
    uses the init image); loading counts as setup, as a model load does."""
    from worker.controlnet import controlnet_models

    monitor.enter_setup()
    try:
        models = controlnet_models(base, spec, ctx.settings.controlnet_dir)
        images = [load_input_image(ctx.storage, unit.get("image_key")) for unit in spec.controlnet or []]
    finally:
        monitor.leave_setup()
    return models, images


def warm_upscaler(ctx: JobContext, base: Any, spec: JobSpec, monitor: StepMonitor) -> Any:
    """The hires fix's model upscaler (kept warm with `base`), or None for a latent mode or a resampler;
    loading counts as setup, as a model load does."""
    from worker.hires import model_upscaler, needs_model_upscaler

    if not needs_model_upscaler(spec):
        return None
    monitor.enter_setup()
    try:
        return model_upscaler(base, spec, ctx.settings.upscalers_dir)
    finally:
        monitor.leave_setup()


def job_monitor(ctx: JobContext, task: Task, attempt: int) -> StepMonitor:
    """The step callback of a job: progress, cancel, time limit, and previews when the job asked for them."""
    monitor = StepMonitor(ctx.watch, task.id, attempt, task.spec.time_limit or ctx.settings.tasks.time_limit)
    spec = task.spec
    every = preview_interval(spec.preview_every, spec.num_inference_steps, ctx.settings.tasks.max_previews)
    if every:
        monitor.previewer = Previewer(every, spec.width, spec.height, ctx.taesd, spec.family)
    monitor.flags.webhook_events = frozenset(wanted_events(spec.callback_url, spec.callback_events, STEP_KINDS))
    return monitor


def notify_started(ctx: JobContext, task: Task, attempt: int) -> None:
    """The job's webhook hears that it started, when it asked to (callback_events)."""
    if wanted_events(task.spec.callback_url, task.spec.callback_events, ("started",)):
        data = started_data(task.id, ctx.info.id, task.spec.model, attempt, task.started_at or time.time())
        send_event_callback(ctx.celery, task.id, "started", data, ctx.settings.callbacks.queue)


def execute(ctx: JobContext, task: Task, attempt: int) -> tuple[TaskStatus, dict] | Generated:
    """Run the pipeline: its images (for the output stage), or the job's ending as a status and fields."""
    spec = task.spec
    monitor = job_monitor(ctx, task, attempt)
    notify_started(ctx, task, attempt)
    try:
        ctx.store.check_still_mine(task.id, attempt, ctx.info.id)   # cancelled while it waited: no model load
        if spec.training:   # a LoRA training job: a LoRA checkpoint, no images (worker/trainingjob.py)
            from worker.trainingjob import run_training_job

            return run_training_job(ctx, task, monitor)
        if spec.merge:      # a model merge: a Stable-diffusion checkpoint, no images (worker/mergejob.py)
            from worker.mergejob import run_merge_job

            return run_merge_job(ctx, task, monitor)
        if spec.extras:     # an extras upscale: the upscaler alone, no pipeline (worker/extras.py)
            from worker.extras import run_extras_job

            started = time.perf_counter()
            result = run_extras_job(ctx, spec, monitor)
            return Generated(result, time.perf_counter() - started, 0)
        base = warm_pipeline(ctx, spec.model, spec.assets, [monitor])
        init_image = load_input_image(ctx.storage, spec.init_image_key)
        mask_image = load_input_image(ctx.storage, spec.mask_image_key)
        started = time.perf_counter()
        refiner = warm_pipeline(ctx, spec.refiner, [], [monitor], keep=(spec.model,)) if spec.refiner else None
        controlnet = warm_controlnets(ctx, base, spec, monitor) if spec.controlnet else None
        upscaler = warm_upscaler(ctx, base, spec, monitor)
        result = generate(base, spec, init_image, worker_loras(ctx.settings.lora_dir), monitor, mask_image, refiner,
                          controlnet, upscaler)
        compute = time.perf_counter() - started
    except JobCancelled:
        return TaskStatus.CANCELLED, {"error": "cancelled by client"}
    except (StaleAttempt, redis.RedisError):
        raise   # not the job's fault: the task is retried (Redis) or dropped (stale)
    except Exception as exc:  # noqa: BLE001 - any pipeline failure fails the job, never the worker
        log.exception("task %s failed", task.id)
        failure = (TaskStatus.FAILED, {"error": describe_error(exc)}, is_out_of_memory(exc))
    else:
        return Generated(result, compute, monitor.steps)
    finally:
        monitor.close()
    # Outside the except block: its traceback no longer pins the activations.
    status, fields, out_of_memory = failure
    if out_of_memory:
        release_memory()
    return status, fields


# --- several jobs in one pipeline call -------------------------------------------------------
@dataclass
class Shared:
    """A job of a shared call as the worker tracks it: the task, its attempt, its monitor and its member."""

    task: Task
    attempt: int
    monitor: StepMonitor
    member: BatchMember | None = None
    outcome: str | None = None       # set once the job is concluded (or found stale)


def run_batch(ctx: JobContext, claims: list[Claim]) -> str:
    """Run jobs that share one pipeline call (TaskStore.pick's companions); each ends on its own."""
    jobs = []
    for claim in claims:
        try:
            task = ctx.store.get(claim.task_id)
        except TaskNotFound:
            continue
        jobs.append(Shared(task, claim.attempt, job_monitor(ctx, task, claim.attempt)))
        notify_started(ctx, task, claim.attempt)
    if not jobs:
        return "stale"
    first = jobs[0].task
    with log_context(task_id=first.id, model=first.spec.model):
        log.info("running %d jobs in one pipeline call: %s", len(jobs), ", ".join(j.task.id for j in jobs))
        ctx.info.state, ctx.info.task_id = WorkerState.BUSY, first.id
        announce(ctx)
        try:
            execute_batch(ctx, jobs)
        finally:
            for job in jobs:
                job.monitor.close()
            ctx.info.state, ctx.info.task_id = WorkerState.READY, None
            ctx.info.models, ctx.info.model_loads = ctx.registry.names(), ctx.registry.loads
            announce(ctx)
    return ",".join(job.outcome or "stale" for job in jobs)


def execute_batch(ctx: JobContext, jobs: list[Shared]) -> None:
    """Run the live jobs' images in one call, then upload and conclude each; every job gets an ending."""
    claims = [Claim(job.task.id, job.attempt) for job in jobs]
    for job, problem in zip(jobs, ctx.store.still_mine(claims, ctx.info.id)):   # cancelled while they waited
        if problem is not None:
            end_dropped(ctx, job, problem)
    live = [job for job in jobs if job.outcome is None]
    if not live:
        return
    spec = live[0].task.spec
    started = None
    try:
        assets = {a["name"]: a for job in live for a in job.task.spec.assets}   # companions may bring their own
        base = warm_pipeline(ctx, spec.model, list(assets.values()), [job.monitor for job in live])
        for job in live:
            job.member = BatchMember(job.task.spec, load_input_image(ctx.storage, job.task.spec.init_image_key),
                                     job.monitor.on_shared_step, job.monitor.offer_latents)
        by_member = {id(job.member): job for job in live}
        started = time.perf_counter()
        generate_batch(base, [job.member for job in live], worker_loras(ctx.settings.lora_dir),
                       on_drop=lambda member: end_dropped(ctx, by_member[id(member)], member.dropped))
    except DROPPING:
        failure = None                         # every job was dropped (and ended) during the call
    except redis.RedisError:
        raise                                  # not the jobs' fault: the delivery is retried, same jobs
    except Exception as exc:  # noqa: BLE001 - a pipeline failure fails the jobs, never the worker
        log.exception("a shared call of %d jobs failed", len(live))
        failure = (describe_error(exc), is_out_of_memory(exc))
    else:
        failure = None
    # Every job gets an ending: its images to the output stage, else a failure (never left processing).
    compute = time.perf_counter() - started if started is not None else 0.0
    for job in live:
        if job.outcome is not None:
            continue
        if job.member is not None and job.member.result is not None:
            finish_shared(ctx, job, compute)
        else:
            error = failure[0] if failure else "the shared pipeline call ended without this job's images"
            job.outcome = conclude(ctx, job.task, job.attempt, TaskStatus.FAILED, {"error": error})
        job.monitor.close()
    if failure and failure[1]:
        release_memory()


def finish_shared(ctx: JobContext, job: Shared, compute: float) -> None:
    """Hand one job's images from a shared call to the output stage (each job is uploaded and ends on its own)."""
    hand_to_outputs(ctx, job.task, job.attempt, Generated(job.member.result, compute, job.monitor.steps))
    job.outcome = "generated"


def end_dropped(ctx: JobContext, job: Shared, reason: BaseException | None) -> None:
    """A job leaves a shared call: cancelled, over its time limit, out of memory alone, or no longer
    this worker's (stale)."""
    job.monitor.close()
    if isinstance(reason, StaleAttempt):
        log.warning("task %s moved on to a newer attempt; dropping attempt %d", job.task.id, job.attempt)
        job.outcome = "stale"
    elif isinstance(reason, JobCancelled):
        job.outcome = conclude(ctx, job.task, job.attempt, TaskStatus.CANCELLED, {"error": "cancelled by client"})
    else:
        job.outcome = conclude(ctx, job.task, job.attempt, TaskStatus.FAILED, {"error": describe_error(reason)})
