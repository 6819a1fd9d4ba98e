"""What live previews cost in throughput: images/s with preview_every off, every 5 steps and every step.

The same jobs through the real stack (API, Redis, S3, one worker), the
three settings alternating `--rounds` times in one run; images/s from the
first submission to the last finish (bench/stack.py run_batch). Previews
use the cheap per-family projection (worker/previews.py). Every step is the
worst case a client can ask for: the worker then makes 50 previews per job
at most (tasks.max_previews), and writes one per progress interval.
Target: every 5 steps costs under 5 % of throughput; off costs nothing
(the step callback checks one attribute).
Run: .venv/bin/python -m bench.previews [--jobs 8] [--size 256] [--steps 20] [--rounds 3]
"""
from __future__ import annotations

import argparse
import statistics

from bench.stack import bench_stack, run_batch

SETTINGS = {"off": 0, "every 5": 5, "every step": 1}


def bodies(args: argparse.Namespace, every: int, offset: int) -> list[dict]:
    return [{"prompt": f"a lighthouse at dusk, variation {n}", "width": args.size, "height": args.size,
             "num_inference_steps": args.steps, "seed": offset + n, "preview_every": every}
            for n in range(args.jobs)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rates: dict[str, list[float]] = {name: [] for name in SETTINGS}
    with bench_stack(env={"SDQ_WORKER_TORCH_THREADS": "2", "SDQ_WORKER_MAX_BATCH": "1"}) as stack:
        run_batch(stack, bodies(args, 0, 0)[:2])                   # warm-up
        for n in range(args.rounds):
            for name, every in SETTINGS.items():
                rates[name].append(run_batch(stack, bodies(args, every, 1000 * n))["images_per_s"])
    off = statistics.median(rates["off"])
    print(f"Preview cost, {args.jobs} jobs of {args.size}x{args.size}, {args.steps} steps, median of {args.rounds} "
          f"alternating rounds (CPU, tiny model):")
    for name in SETTINGS:
        median = statistics.median(rates[name])
        print(f"  {name:<11} {median:6.2f} images/s   {median / off:6.3f} x off   "
              f"(rounds: {', '.join(f'{r:.2f}' for r in rates[name])})")


if __name__ == "__main__":
    main()
