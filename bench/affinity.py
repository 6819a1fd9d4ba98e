"""Model affinity: an alternating two-model stream on two workers that can each hold one model.

Same run, same jobs: routing.affinity on (the default) and off (plain
arrival order). Prints model loads beyond the one each worker makes at start
and images/s. With affinity each worker should load each model at most once.
Run: .venv/bin/python -m bench.affinity [--jobs 40]
"""
from __future__ import annotations

import argparse
import shutil

import redis

from bench.stack import bench_stack, run_batch, stop_workers
from common.store import WorkerRegistry

MODELS = ("sdq-tiny", "sdq-tiny-b")


def stream(jobs: int, offset: int) -> list[dict]:
    return [{"prompt": "a lighthouse", "model": MODELS[n % 2], "width": 64, "height": 64,
             "num_inference_steps": 4, "seed": offset + n} for n in range(jobs)]


def measure(stack, jobs: int, affinity: bool, tag: str) -> dict:
    env = {"SDQ_MODELS_MAX_LOADED": "1", "SDQ_ROUTING_AFFINITY": "1" if affinity else "0"}
    names = [f"{tag}-1", f"{tag}-2"]
    for name in names:
        stack.start_worker(name, env=env, wait=False)
    for name in names:
        stack.wait_worker_ready(stack.services[name])
    result = run_batch(stack, stream(jobs, 0))
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    mine = [w for w in WorkerRegistry(client).live() if w.name.split("@")[0] in names]
    result["extra_loads"] = sum(w.model_loads - 1 for w in mine)     # each loaded its default at start
    result["loads_per_worker"] = {w.name: w.model_loads for w in mine}
    stop_workers(stack, names)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=40)
    args = parser.parse_args()
    with bench_stack(worker=False) as stack:
        models = stack.settings().models_dir
        shutil.copytree(models / MODELS[0], models / MODELS[1])
        on = measure(stack, args.jobs, True, "aff-on")
        off = measure(stack, args.jobs, False, "aff-off")
    print(f"{args.jobs} jobs alternating {MODELS[0]} / {MODELS[1]}, 2 workers holding 1 model each (64x64, 4 steps)")
    for label, r in (("affinity on ", on), ("affinity off", off)):
        print(f"{label}: model loads after start {r['extra_loads']:3d} {r['loads_per_worker']}, "
              f"{r['images_per_s']:5.2f} images/s ({r['seconds']:.1f} s)")
    ok = all(n <= 1 + len(MODELS) - 1 for n in on["loads_per_worker"].values())
    print(f"no thrash with affinity (each worker loads each model at most once): {'MET' if ok else 'MISSED'}")


if __name__ == "__main__":
    main()
