"""How many SSE streams (GET /api/v1/tasks/{id}/events) one API process holds, and what they cost it.

One gunicorn process (gthread), no worker: N tasks wait in the queue and N
clients hold one stream each. Then: the process's resident memory per
stream, /health latency while they are held, every stream's final event
after all tasks are cancelled at once (the time from the cancels to the
last stream's `cancelled`), and one stream past api.max_streams refused
with a 503. Each open stream holds one thread that sleeps on the process's
one pub/sub listener (api/waiter.py); no stream holds a Redis connection.
Run: .venv/bin/python -m bench.streams [--streams 200]
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time

import requests

from bench.stack import BENCH_KEY, bench_stack, percentile
from sdqueue_client import Client

HEADERS = {"X-API-Key": BENCH_KEY}


def rss_kib(pid: int) -> int:
    """Resident memory of a process, from /proc (KiB)."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def api_worker_pid(master: int) -> int:
    """The one gunicorn worker process under the master (the process that serves the streams)."""
    with open(f"/proc/{master}/task/{master}/children") as children:
        return int(children.read().split()[0])


def hold_stream(base: str, task_id: str, opened: threading.Barrier, ended: dict, errors: list) -> None:
    """Open the task's stream, say so, and read it to its final event (recording when it came)."""
    try:
        with Client(base, BENCH_KEY, timeout=600, retries=0) as client:     # the project's own client, one each
            events = client.stream(task_id)
            first = next(events)
            assert first.type == "queued", first
            opened.wait()
            for event in events:
                if event.final:
                    ended[task_id] = time.monotonic()
                    return
    except Exception as exc:  # noqa: BLE001 - counted and shown
        errors.append(repr(exc))
        try:
            opened.abort()
        except threading.BrokenBarrierError:
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=200)
    args = parser.parse_args()
    n = args.streams
    env = {"SDQ_API_WORKERS": "1", "SDQ_API_THREADS": str(n + 48), "SDQ_API_MAX_STREAMS": str(n),
           "SDQ_API_MAX_WAITERS": "16"}
    with bench_stack(worker=False, env=env) as stack:
        base = stack.api_url
        session = requests.Session()
        session.headers.update(HEADERS)
        ids = [session.post(f"{base}/api/v1/generate", json={"prompt": f"stream {i}", "width": 64, "height": 64},
                            timeout=30).json()["task_id"] for i in range(n + 1)]
        pid = api_worker_pid(stack.services["api"].proc.pid)
        before = rss_kib(pid)
        opened, ended, errors = threading.Barrier(n + 1), {}, []
        threads = [threading.Thread(target=hold_stream, args=(base, task_id, opened, ended, errors), daemon=True)
                   for task_id in ids[:n]]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        opened.wait(timeout=300)
        open_seconds = time.monotonic() - started
        held = rss_kib(pid)
        health = []
        for _ in range(50):
            t0 = time.perf_counter()
            session.get(f"{base}/health", timeout=30).raise_for_status()
            health.append((time.perf_counter() - t0) * 1000)
        refused = session.get(f"{base}/api/v1/tasks/{ids[n]}/events", timeout=30)
        cancel_at = time.monotonic()
        for task_id in ids[:n]:
            session.delete(f"{base}/api/v1/tasks/{task_id}", timeout=30)
        for thread in threads:
            thread.join(timeout=120)
        last = max(ended.values()) if ended else float("nan")
        print(f"SSE streams held by one API process (gthread, {n + 48} threads, api.max_streams {n}):")
        print(f"  streams opened and holding:        {n - len(errors)} of {n} (in {open_seconds:.1f} s)")
        print(f"  API process RSS:                    {before / 1024:.1f} MiB -> {held / 1024:.1f} MiB "
              f"({(held - before) / n:.0f} KiB per stream)")
        print(f"  /health while held:                 p50 {statistics.median(health):.1f} ms, "
              f"p99 {percentile(health, 99):.1f} ms")
        print(f"  one more stream:                    HTTP {refused.status_code} "
              f"(Retry-After {refused.headers.get('Retry-After')})")
        print(f"  final events after {n} cancels:    {len(ended)} of {n}; "
              f"last one {last - cancel_at:.2f} s after the first cancel")
        if errors:
            print(f"  errors: {errors[:3]}")


if __name__ == "__main__":
    main()
