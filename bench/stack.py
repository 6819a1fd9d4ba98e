"""Start a throwaway local stack for a benchmark (same processes as `make run`)."""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dev.localstack import LocalStack, build_default_model, free_port, free_port_block  # noqa: E402

BENCH_KEY = "bench-key-0123456789abcdef"


@contextlib.contextmanager
def bench_stack(worker: bool = True, env: dict[str, str] | None = None) -> Iterator[LocalStack]:
    """Redis, S3, API (and optionally one worker) on free loopback ports in a temp dir."""
    with tempfile.TemporaryDirectory(prefix="sdq-bench-") as tmp:
        stack = LocalStack(data_dir=Path(tmp), redis_port=free_port(), s3_port=free_port_block(),
                           api_port=free_port(), flower_port=free_port(), api_keys=[BENCH_KEY],
                           flower_password="bench",
                           extra_env={"SDQ_CONFIG": os.devnull, "SDQ_WORKER_TORCH_THREADS": "1",
                                      "SDQ_API_SUBMIT_LIMIT": "", "SDQ_API_READ_LIMIT": "",
                                      "SDQ_TASKS_MAX_PENDING_PER_KEY": "0",   # one key floods the queue on purpose
                                      **(env or {})})
        try:
            build_default_model(stack)
            stack.start_redis()
            stack.start_s3()
            stack.ensure_bucket()
            if worker:
                stack.start_worker("worker")
            stack.start_api()
            yield stack
        finally:
            stack.stop()


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def run_batch(stack: LocalStack, bodies: list[dict], timeout: float = 900) -> dict:
    """Submit every body at once, wait for all to end; images/s from first submit to last finish.

    Finish times come from the task hashes (the worker's own clock), so the
    client's polling adds nothing to the figure.
    """
    import time

    import redis
    import requests

    from common.store import keys

    session = requests.Session()
    session.headers["X-API-Key"] = BENCH_KEY
    started = time.time()
    ids = []
    for body in bodies:
        response = session.post(stack.api_url + "/api/v1/generate", json=body, timeout=30)
        response.raise_for_status()
        ids.append(response.json()["task_id"])
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    deadline = time.monotonic() + timeout
    for task_id in ids:
        while client.hget(keys.TASK(task_id), "status") not in ("completed", "failed", "cancelled"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"batch not finished after {timeout:.0f} s")
            time.sleep(0.05)
    records = [client.hgetall(keys.TASK(i)) for i in ids]
    failed = [r.get("error") for r in records if r["status"] != "completed"]
    if failed:
        raise RuntimeError(f"{len(failed)} jobs did not complete: {failed[:3]}")
    elapsed = max(float(r["finished_at"]) for r in records) - started
    images = sum(len(json.loads(r["result_keys"])) for r in records)
    latencies = [float(r["finished_at"]) - float(r["created_at"]) for r in records]
    return {"jobs": len(ids), "images": images, "seconds": elapsed, "images_per_s": images / elapsed,
            "workers": sorted({r["worker"] for r in records}), "latencies": latencies,
            "calls": len({r["started_at"] for r in records})}


def stop_workers(stack: LocalStack, names: list[str]) -> None:
    for name in names:
        stack.services.pop(name).stop()
