"""Scale-out: images/s with 1 worker and with 2 worker replicas, same run, same jobs.

Tiny model, torch limited to 1 thread per worker (as one GPU per worker
would be), every job submitted at once; images/s = images / (first submit
-> last finish). Target: 2 replicas >= 1.8 x one.
Run: .venv/bin/python -m bench.scale [--jobs 24] [--size 192] [--steps 16]
"""
from __future__ import annotations

import argparse

from bench.stack import bench_stack, run_batch, stop_workers


def batch(args: argparse.Namespace, offset: int) -> list[dict]:
    return [{"prompt": "a harbour at dawn", "width": args.size, "height": args.size,
             "num_inference_steps": args.steps, "seed": offset + n} for n in range(args.jobs)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()
    with bench_stack(worker=False) as stack:
        stack.start_worker("w1")
        run_batch(stack, batch(args, 0)[:4])                      # warm-up
        one = run_batch(stack, batch(args, 100))
        stack.start_worker("w2")
        run_batch(stack, batch(args, 200)[:4])
        two = run_batch(stack, batch(args, 300))
        stop_workers(stack, ["w1", "w2"])
    ratio = two["images_per_s"] / one["images_per_s"]
    print(f"jobs: {args.jobs} x 1 image, tiny model {args.size}x{args.size}, {args.steps} steps, torch threads 1/worker")
    print(f"1 worker:   {one['images_per_s']:6.2f} images/s  ({one['seconds']:.1f} s)")
    print(f"2 workers:  {two['images_per_s']:6.2f} images/s  ({two['seconds']:.1f} s, ran on {len(two['workers'])} workers)")
    print(f"scale-out ratio: {ratio:.2f}x   (target >= 1.8)")
    print(f"scale target: {'MET' if ratio >= 1.8 else 'MISSED'}")


if __name__ == "__main__":
    main()
