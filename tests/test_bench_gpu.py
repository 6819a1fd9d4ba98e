"""bench/gpu.py works before a GPU is lent: its tiny CPU variant runs every step (build, FLOPs, plain
diffusers, the real stack at concurrency 1 and 8) and writes its report. No figure is asserted."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
    for clients in ("concurrency_1", "concurrency_8"):
        assert report["stack"][clients]["images_per_s"] > 0
    assert report["stack"]["worker"]["max_batch"] == 8
