"""Cross-request batching on the CPU: images/s with worker.max_batch 8 vs 1, same run, same jobs.

16 single-image jobs submitted at once through the real stack (API, Redis,
S3, one worker) to a worker with max_batch 1, then to one with max_batch 8
(alternating, `--rounds` times); images/s = images / (first submit -> last
finish), latency = each job's created -> finished. Target: max_batch 8 >=
1.5 x max_batch 1 on the CPU.

Why 128² at 20 steps by default: batching wins where one image leaves the
hardware idle between small kernels. On two CPU cores that is a small
image; at 256² and beyond a single image already keeps the cores busy and a
batch of 8 gains little (plain diffusers: 2.07x at 128², 1.22x at 256²). On
a GPU the same holds at 512² (see bench/gpu.py).
Run: .venv/bin/python -m bench.batching [--jobs 16] [--size 128] [--steps 20] [--rounds 2]
"""
from __future__ import annotations

import argparse
import statistics

from bench.stack import bench_stack, percentile, run_batch, stop_workers


def jobs(args: argparse.Namespace, offset: int) -> list[dict]:
    return [{"prompt": f"a harbour at dawn, variation {n}", "width": args.size, "height": args.size,
             "num_inference_steps": args.steps, "seed": offset + n} for n in range(args.jobs)]


def measure(stack, name: str, max_batch: int, bodies: list[dict], threads: int) -> dict:
    """One worker with this max_batch runs the jobs (after a warm-up); then it stops."""
    stack.start_worker(name, env={"SDQ_WORKER_MAX_BATCH": str(max_batch), "SDQ_WORKER_TORCH_THREADS": str(threads)})
    run_batch(stack, bodies[:2])                                 # warm-up: first calls allocate
    result = run_batch(stack, bodies)
    stop_workers(stack, [name])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the worker")
    args = parser.parse_args()
    runs: dict[int, list[dict]] = {1: [], 8: []}
    with bench_stack(worker=False) as stack:
        for n in range(args.rounds):
            for max_batch in (1, 8):
                runs[max_batch].append(measure(stack, f"b{max_batch}-{n}", max_batch,
                                               jobs(args, 1000 * n + 100 * max_batch), args.threads))
    print(f"jobs: {args.jobs} x 1 image, tiny model {args.size}x{args.size}, {args.steps} steps, "
          f"torch threads {args.threads}, {args.rounds} rounds (alternating); medians:")
    figures = {}
    for max_batch, results in runs.items():
        rate = statistics.median(r["images_per_s"] for r in results)
        latencies = [x for r in results for x in r["latencies"]]
        calls = statistics.median(r["calls"] for r in results)
        figures[max_batch] = rate
        print(f"max_batch {max_batch}:  {rate:6.2f} images/s   latency p50 {percentile(latencies, 50):6.2f} s"
              f"   p95 {percentile(latencies, 95):6.2f} s   pipeline calls {calls:g}")
    ratio = figures[8] / figures[1]
    print(f"batching ratio: {ratio:.2f}x   (target >= 1.5 on the CPU)")
    print(f"batching target: {'MET' if ratio >= 1.5 else 'MISSED'}")


if __name__ == "__main__":
    main()
