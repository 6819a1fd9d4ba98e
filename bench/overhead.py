"""Queue overhead of sdqueue: what the service adds around the pipeline itself.

For N jobs with the tiny model, one at a time: overhead = (submit -> completed
seen by the client, long-polling GET ?wait=) - (pipeline compute measured in
the worker). Targets: p50 <= 25 ms, p95 <= 60 ms.
Run: .venv/bin/python -m bench.overhead [--jobs 200] (or make bench)
"""
from __future__ import annotations

import argparse
import time

import redis
import requests

from bench.stack import BENCH_KEY, bench_stack, percentile
from common.store import keys

JOB = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "num_inference_steps": 4, "seed": 1}


def run_job(session: requests.Session, base: str) -> tuple[str, float]:
    started = time.perf_counter()
    response = session.post(base + "/api/v1/generate", json=JOB)
    response.raise_for_status()
    task_id = response.json()["task_id"]
    while True:
        body = session.get(f"{base}/api/v1/tasks/{task_id}?wait=30").json()
        if body["status"] in ("completed", "failed", "cancelled"):
            break
    elapsed = time.perf_counter() - started
    if body["status"] != "completed":
        raise RuntimeError(f"job {task_id} ended {body['status']}: {body['error_message']}")
    return task_id, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    with bench_stack() as stack:
        client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
        session = requests.Session()
        session.headers["X-API-Key"] = BENCH_KEY
        for _ in range(args.warmup):
            run_job(session, stack.api_url)
        totals, computes, overheads = [], [], []
        for _ in range(args.jobs):
            task_id, total = run_job(session, stack.api_url)
            compute = float(client.hget(keys.TASK(task_id), "compute_seconds"))
            totals.append(total * 1000)
            computes.append(compute * 1000)
            overheads.append((total - compute) * 1000)
    p50, p95 = percentile(overheads, 50), percentile(overheads, 95)
    print(f"jobs: {args.jobs} (tiny model, 64x64, 4 steps, one at a time)")
    print(f"end-to-end ms:   p50 {percentile(totals, 50):7.1f}  p95 {percentile(totals, 95):7.1f}")
    print(f"compute ms:      p50 {percentile(computes, 50):7.1f}  p95 {percentile(computes, 95):7.1f}")
    print(f"overhead ms:     p50 {p50:7.1f}  p95 {p95:7.1f}   (targets: p50 <= 25, p95 <= 60)")
    print(f"overhead target: {'MET' if p50 <= 25 and p95 <= 60 else 'MISSED'}")


if __name__ == "__main__":
    main()
