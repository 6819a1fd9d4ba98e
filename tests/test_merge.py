"""Checkpoint merging (worker/merge.py) on CPU: two tiny single-file checkpoints merge to their weighted sum,
three to A + (B - C)·M; tensors only A has are kept; different architectures are refused naming the tensor."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from worker.merge import MergeError, merge_files


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny SD 1.x single-file checkpoint and two perturbed copies."""
    from dev.tinymodel import build_tiny_model
    from tests.single_file import write_single_file_checkpoint

    root = tmp_path_factory.mktemp("merge")
    build_tiny_model(root / "tiny")
    a = root / "a.safetensors"
    write_single_file_checkpoint(root / "tiny", a)
    weights = load_file(a)
    generator = torch.Generator().manual_seed(3)
    paths = [a]
    for name in ("b", "c"):
        perturbed = {k: v + torch.randn(v.shape, generator=generator).to(v.dtype) if v.is_floating_point() else v
                     for k, v in weights.items()}
        save_file(perturbed, str(root / f"{name}.safetensors"))
        paths.append(root / f"{name}.safetensors")
    return paths


def test_a_weighted_sum_is_the_weighted_sum_of_the_weights(checkpoints, tmp_path):
    a, b, _ = checkpoints
    out = tmp_path / "merged.safetensors"
    report = merge_files(a, b, None, out, "weighted_sum", 0.3)
    merged, wa, wb = load_file(out), load_file(a), load_file(b)
    assert set(merged) == set(wa) and report.merged > 0 and report.kept_from_primary == []
    for key, value in wa.items():
        if value.is_floating_point():
            assert torch.allclose(merged[key].float(), wa[key].float() * 0.7 + wb[key].float() * 0.3, atol=1e-5), key
        else:
            assert torch.equal(merged[key], value)


def test_add_difference_adds_the_secondary_s_tuning(checkpoints, tmp_path):
    a, b, c = checkpoints
    out = tmp_path / "diff.safetensors"
    merge_files(a, b, c, out, "add_difference", 0.5, dtype="float16")
    merged, wa, wb, wc = (load_file(p) for p in (out, a, b, c))
    key = next(k for k, v in wa.items() if v.is_floating_point() and v.ndim == 2)
    expected = (wa[key].float() + (wb[key].float() - wc[key].float()) * 0.5).half()
    assert merged[key].dtype == torch.float16 and torch.equal(merged[key], expected)


def test_tensors_only_the_primary_has_are_kept(checkpoints, tmp_path):
    a, b, _ = checkpoints
    partial = {k: v for n, (k, v) in enumerate(load_file(b).items()) if n % 5}
    short = tmp_path / "short.safetensors"
    save_file(partial, str(short))
    report = merge_files(a, short, None, tmp_path / "out.safetensors", "weighted_sum", 0.5)
    assert report.kept_from_primary and all(key not in partial for key in report.kept_from_primary)


def test_different_architectures_and_bad_requests_are_refused(checkpoints, tmp_path):
    a, b, c = checkpoints
    weights = load_file(b)
    key = next(k for k, v in weights.items() if v.is_floating_point() and v.ndim == 2)
    weights[key] = torch.zeros(3, 3)
    odd = tmp_path / "odd.safetensors"
    save_file(weights, str(odd))
    with pytest.raises(MergeError, match=key.replace(".", r"\.")):
        merge_files(a, odd, None, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "x.safetensors.partial").exists()
    with pytest.raises(MergeError, match="tertiary"):
        merge_files(a, b, None, tmp_path / "y.safetensors", "add_difference")
    with pytest.raises(MergeError, match="multiplier"):
        merge_files(a, b, None, tmp_path / "y.safetensors", "weighted_sum", 1.5)
    with pytest.raises(MergeError, match="method"):
        merge_files(a, b, c, tmp_path / "y.safetensors", "average")


def test_a_merge_stopped_between_tensors_writes_nothing(checkpoints, tmp_path):
    """A job's step callback raises to cancel (worker/monitor.py): the merge stops there and no file is left."""
    from common.errors import JobCancelled
    from worker.merge import merge_tensors

    a, b, _ = checkpoints
    seen = []

    def cancel_at_three(done: int, total: int) -> None:
        seen.append((done, total))
        if done == 3:
            raise JobCancelled("task")

    with pytest.raises(JobCancelled):
        merge_files(a, b, None, tmp_path / "stopped.safetensors", on_tensor=cancel_at_three)
    assert [done for done, _ in seen] == [1, 2, 3] and seen[0][1] > 3
    assert list(tmp_path.iterdir()) == []
    merged = merge_tensors(a, b, None, on_tensor=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (len(merged.tensors), len(merged.tensors))
