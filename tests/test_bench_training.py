"""bench/training.py runs: its short CPU benchmark prints every figure, and --count prints the LoRA sizes
docs/training.md derives by hand (14rC + 2rD per transformer block). No timing is asserted."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_bench(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "bench.training", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_the_training_benchmark_prints_steps_checkpoint_and_resume_figures():
    out = run_bench("--rounds", "1", "--steps", "3")
    for size, batch in ((64, 1), (64, 2), (128, 1), (128, 2)):
        assert f"{size:>3}² batch {batch}:" in out
    assert "checkpoint at 128², rank 8:" in out and "state_from_bytes" in out
    assert "resumed from step" in out


def test_the_counts_behind_docs_training_md():
    out = run_bench("--count", "--rank", "8")
    assert "sd15: UNet 859.5 M parameters" in out and "1.594 M parameters (128 layers)" in out   # 199 296 x 8
    assert "sdxl: UNet 2567.5 M parameters" in out and "11.612 M parameters (560 layers)" in out  # 1 451 520 x 8
    assert out.count("activations kept for backward") == 4
