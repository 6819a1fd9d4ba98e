"""Start a worker process: `python -m worker.main --role gpu|callbacks`.

Why a launcher instead of `celery -A`: the device must be pinned before
torch is imported, settings are read once here and passed explicitly, and
the default pipeline is warm before the first job is consumed. GPU workers
run one job at a time (solo pool, prefetch 1, acks_late); the callback
worker runs webhook deliveries on threads.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import uuid
from pathlib import Path

from common.catalog import default_model_name, find_model, locate_model
from common.logs import configure_logging, install_celery_logging, set_process_context
from common.queue import create_celery
from common.settings import load_settings
from common.storage import Storage
from common.store import WorkerInfo, WorkerState, open_stores
from worker.device import pin_device

log = logging.getLogger("sdqueue.worker")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="sdqueue worker")
    parser.add_argument("--role", choices=("gpu", "callbacks"), default="gpu")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (overrides worker.device)")
    parser.add_argument("--name", default=None, help="worker name (overrides worker.name)")
    parser.add_argument("--queues", default=None, help="comma-separated queues to consume")
    parser.add_argument("--pool", default=None,
                        help="worker pool to serve (its queue; overrides worker.pool; default tasks.queue)")
    parser.add_argument("--concurrency", type=int, default=8, help="callback worker threads")
    parser.add_argument("--loglevel", default=None, help="log level (overrides logs.level)")
    return parser.parse_args(argv)


def default_name(role: str, configured_device: str, device: str) -> str:
    """callbacks@host, cpu@host, or gpuN@host after the card configured (before pinning renumbers it)."""
    if role == "callbacks":
        tag = "callbacks"
    elif device == "cpu":
        tag = "cpu"
    else:
        tag = "gpu" + (configured_device.split(":", 1)[1] if ":" in configured_device else "0")
    return f"{tag}@{socket.gethostname()}"


def consumed_queues(args: argparse.Namespace, settings) -> list[str]:
    """--queues, else the pool (--pool / worker.pool), else tasks.queue; callbacks.queue for that role."""
    if args.queues:
        return [q for q in args.queues.split(",") if q]
    if args.role == "callbacks":
        return [settings.callbacks.queue]
    return [args.pool or settings.worker.pool or settings.tasks.queue]


def prepare_torch(pinned: str, settings) -> str:
    """Import torch (after pinning), quiet the ML libraries, set threads; the device to use.

    Only GPU workers do this: the callback worker never imports torch.
    """
    from worker.quiet import quiet_libraries

    quiet_libraries()
    from worker.device import resolve_device

    device = resolve_device(pinned)
    if settings.worker.torch_threads > 0:
        import torch

        torch.set_num_threads(settings.worker.torch_threads)
    return device


def max_batch_for(setting: int, device: str) -> int:
    """worker.max_batch, 0 meaning the device's default: 8 on CUDA (a batch-1 step leaves most of a GPU
    idle), 1 on the CPU (already compute-bound at useful sizes; bench/batching.py measures the gain)."""
    if setting > 0:
        return setting
    return 8 if device.startswith("cuda") else 1


def ensure_default_model(settings) -> str:
    """The default model's name; builds the tiny random-weight model if none exists."""
    name = default_model_name(settings.models_dir, settings.models.default)
    if name is None:
        from dev.tinymodel import TINY_MODEL_NAME, ensure_tiny_model

        ensure_tiny_model(settings.models_dir / TINY_MODEL_NAME)
        name = TINY_MODEL_NAME
    return name


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = load_settings()
    args.loglevel = (args.loglevel or settings.logs.level).upper()
    configure_logging(settings.logs.format, args.loglevel, sys.stdout)   # JSON lines by default (common/logs.py)
    configured = args.device if args.device is not None else settings.worker.device
    pinned = pin_device(configured if args.role == "gpu" else "cpu")
    device = prepare_torch(pinned, settings) if args.role == "gpu" else "cpu"
    name = args.name or settings.worker.name or default_name(args.role, configured, device)
    queues = consumed_queues(args, settings)
    set_process_context(worker=name)
    info = WorkerInfo(id=f"{name}:{os.getpid()}:{uuid.uuid4().hex[:8]}", name=name, device=device,
                      queues=queues, max_batch=max_batch_for(settings.worker.max_batch, device) if args.role == "gpu" else 1)
    run_worker(settings, args, info)


def mark_ready_when_consuming(info: WorkerInfo, heartbeat) -> None:
    """Report `ready` once Celery consumes (and handles SIGTERM as a warm shutdown), not before.

    Why: a rolling restart waits for the new worker to be ready before stopping
    the next one; a worker still starting Celery would be killed outright by a
    SIGTERM (harmless, it holds no job, but it is not the promised clean exit).
    """
    from celery.signals import worker_ready

    @worker_ready.connect(weak=False)
    def ready(**_) -> None:
        info.state = WorkerState.READY
        heartbeat.beat()
        log.info("worker %s ready on %s, queues %s, models %s", info.name, info.device, info.queues, info.models)


def hand_back_on_shutdown(ctx) -> None:
    """A warm shutdown (SIGTERM) sets ctx.stopping: a training job checkpoints at its next step and is left to the
    reaper (worker/trainingjob.py), instead of holding the stop for hours until the orchestrator kills it."""
    from celery.signals import worker_shutting_down

    @worker_shutting_down.connect(weak=False)
    def stopping(**_) -> None:
        ctx.stopping.set()


def run_worker(settings, args: argparse.Namespace, info: WorkerInfo) -> None:
    from worker.heartbeat import Heartbeat
    from worker.jobs import JobContext, owed_tasks
    from common.queue import send_event_callback
    from worker.previews import TaesdCache
    from worker.registry import PipelineRegistry, load_pipeline
    from worker.metrics import start_metrics_server
    from worker.tasks import register_tasks
    from worker.speedups import Speedups, apply_process_wide, warm_up
    from worker.outputs import OutputStage
    from worker.watch import JobWatch
    from worker.watchdog import Watchdog, WatchdogLimits, end_hung_jobs

    stores = open_stores(settings.redis.url, settings.tasks.retention_seconds, settings.aws.models_prefix,
                         settings.datasets.prefix)
    storage = Storage(settings)
    celery = create_celery(settings, name="sdqueue-worker")
    default = ensure_default_model(settings) if args.role == "gpu" else ""
    # Empty: each single file finds a diffusers folder of its own family and architecture (pipelines/base.py).
    sf_config = Path(settings.models.single_file_config) if settings.models.single_file_config else None
    speedups = Speedups.for_device(settings, info.device) if args.role == "gpu" else Speedups(sdpa=False)
    apply_process_wide(speedups)
    info.speedups, info.compiled = speedups.names(), speedups.compile

    def loader(model_name: str):
        model = locate_model(settings.models_dir, model_name, settings.models.overrides)
        if model is None:
            raise FileNotFoundError(f"model '{model_name}' not found in {settings.models_dir}")
        return load_pipeline(model, info.device, sf_config, settings.worker.dtype, speedups, settings.embeddings_dir)

    registry = PipelineRegistry(settings.models.max_loaded, loader)
    # Before the default model loads: its load is counted, and a scrape during a long load answers.
    start_metrics_server(settings.metrics.worker_port, settings.metrics.worker_addr, info.name, info.device,
                         ",".join(info.queues), registry.names)
    watch = JobWatch(stores.tasks, info.id, settings.tasks.progress_interval, settings.tasks.preview_size,
                     settings.tasks.preview_format)
    watch.start()
    outputs = OutputStage(settings.worker.output_depth)
    ctx = JobContext(settings, stores.tasks, stores.workers, storage, registry, celery, info, watch, outputs,
                     info.max_batch, taesd=TaesdCache(settings.models_dir), checkpoints=stores.checkpoints,
                     model_jobs=stores.model_jobs)
    watch.notify = lambda task_id, kind, data: send_event_callback(celery, task_id, kind, data,
                                                                    settings.callbacks.queue)
    register_tasks(celery, lambda: ctx)
    hand_back_on_shutdown(ctx)
    heartbeat = Heartbeat(stores.tasks, stores.workers, celery, info, settings, owed=lambda: owed_tasks(ctx))
    heartbeat.beat()
    heartbeat.start()
    if args.role == "gpu":
        Watchdog(watch, WatchdogLimits.from_settings(settings), lambda hung: end_hung_jobs(ctx, hung)).start()
    try:
        if args.role == "gpu":
            storage.ensure_bucket()
            try:
                pipe = registry.get(default)
                info.dtype = str(pipe.dtype).removeprefix("torch.")
                if speedups.compile:   # before `ready`: the first jobs must not pay for compiling
                    warm_up(pipe, find_model(settings.models_dir, default, settings.models.overrides), info.max_batch)
            except Exception as exc:
                heartbeat.stop(forget=False)   # /health shows setup_failed until the key expires
                info.state, info.error = WorkerState.SETUP_FAILED, f"{type(exc).__name__}: {exc}"
                stores.workers.publish(info, settings.workers.heartbeat_ttl)
                log.exception("could not load default model %s", default)
                raise SystemExit(3) from exc
            info.models, info.model_loads = registry.names(), registry.loads
        mark_ready_when_consuming(info, heartbeat)
        pool = ["--pool=solo"] if args.role == "gpu" else ["--pool=threads", f"--concurrency={args.concurrency}"]
        install_celery_logging(args.loglevel)   # Celery keeps our handlers; task lines carry task_id
        quiet = ["--quiet"] if settings.logs.format == "json" else []   # no ASCII-art banner among JSON lines
        celery.worker_main([*quiet, "worker", *pool, "-Q", ",".join(info.queues), "-n", info.name,
                            "--prefetch-multiplier=1", "--without-gossip", "--without-mingle",
                            "--without-heartbeat", "-E", f"--loglevel={args.loglevel}"])
    finally:
        if not outputs.drain(timeout=settings.tasks.time_limit):   # a warm shutdown ends the jobs it generated
            log.error("the output stage did not drain; its jobs are rescued by the reaper")
        if info.state != WorkerState.SETUP_FAILED:
            heartbeat.stop()


if __name__ == "__main__":
    main()
