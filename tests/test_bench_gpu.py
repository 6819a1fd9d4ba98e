"""bench/gpu.py works before a GPU is lent: its tiny CPU variant runs every step (build, FLOPs, plain
diffusers, LoRA training through worker/training.py, the real stack at concurrency 1 and 8) and writes its
report; the lines only a GPU run prints are formatted from GPU-shaped figures. No figure is asserted."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_benchmark_runs_end_to_end_in_its_tiny_cpu_variant(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "SDQ_CONFIG": os.devnull}
    result = subprocess.run([sys.executable, "-m", "bench.gpu", "--tiny"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=420)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "gpu targets:" in result.stdout
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert set(report["archs"]) == {"sd15", "sdxl"}
    for figures in report["archs"].values():
        assert figures["unet_flops_per_step"] > 0 and figures["plain"]["it_per_s"] > 0
        training = figures["training"]
        # The rates are figures for bench/RESULTS.md, not asserted: only that they were measured and agree.
        assert "error" not in training and training["step_flops_est"] > 0
        assert training["images_per_s"] == pytest.approx(training["steps_per_s"] * training["batch"])
        assert training["rank"] == 8 and training["batch"] == 1 and training["mixed_precision"] == "no"
        assert training["weights_bytes"] is None and "peak_bytes" not in training     # CUDA only
    assert result.stdout.count("LoRA training 64² rank 8 batch 1") == 2
    for clients in ("concurrency_1", "concurrency_8"):
        assert report["stack"][clients]["images_per_s"] > 0
    assert report["stack"]["worker"]["max_batch"] == 8


def test_the_gpu_only_training_lines_read_as_documented():
    """Peak memory and an out-of-memory are only seen on a GPU: format them from figures shaped like a GPU run's."""
    from bench.gpu import report_training

    gib = 2 ** 30
    ran = {"size": 1024, "rank": 8, "batch": 1, "mixed_precision": "fp16", "weights_bytes": 7 * gib,
           "peak_bytes": 20 * gib, "steps_per_s": 2.5, "flop_utilisation_est": 0.2}
    line = report_training("sdxl", ran)
    assert "2.50 steps/s" in line and "peak memory 20.00 GiB (7.00 GiB warm pipeline + 13.00 GiB training)" in line
    assert "~20 % of the FLOP peak (est.)" in line
    oom = {**{k: v for k, v in ran.items() if k not in ("steps_per_s", "flop_utilisation_est")},
           "error": "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB"}
    assert "out of memory" in report_training("sdxl", oom) and "steps/s" not in report_training("sdxl", oom)
