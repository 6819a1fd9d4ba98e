"""Checkpoint merging (issue 16, model merge): two or three single-file checkpoints of one family into one.

Why these two methods: they are the AUTOMATIC1111 web UI's checkpoint merger
(and what the AWS SD extension's run-model-merge runs): weighted sum
A·(1−M) + B·M, and add difference A + (B − C)·M (C is the base B was tuned
from, so B's tuning is added to A). Tensors are read one at a time with
safetensors' lazy reader, so memory holds the output plus one input tensor
per file, not three models. A key present in A but missing from B (or C) is
kept from A, as the web UI does; a key whose shapes differ means the files
are of different families or architectures, and the merge is refused
naming it. The output keeps A's dtype per tensor unless one is asked for.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

METHODS = ("weighted_sum", "add_difference")
DTYPES = ("keep", "float16", "bfloat16", "float32")


class MergeError(ValueError):
    """The checkpoints cannot be merged as asked; the message names the file or tensor."""


@dataclass
class MergeReport:
    """What a merge did: tensors merged, and those kept from the primary because another file lacks them."""

    merged: int
    kept_from_primary: list[str]


@dataclass
class Merged:
    """A merge held in memory: the tensors, the primary's metadata (with the merge noted), and the report."""

    tensors: dict[str, Any]
    metadata: dict[str, str]
    report: MergeReport


def merged_tensor(a: Any, b: Any, c: Any | None, method: str, multiplier: float) -> Any:
    """One tensor of the result, computed in float32 (fp16 sums lose precision), in A's dtype."""
    a32, b32 = a.float(), b.float()
    if method == "weighted_sum":
        out = a32 * (1 - multiplier) + b32 * multiplier
    else:
        out = a32 + (b32 - c.float()) * multiplier
    return out.to(a.dtype)


def check_request(method: str, multiplier: float, tertiary: Path | None) -> None:
    if method not in METHODS:
        raise MergeError(f"method: {method!r} is not one of {', '.join(METHODS)}")
    if not 0 <= multiplier <= 1 and method == "weighted_sum":
        raise MergeError(f"multiplier: {multiplier} is outside 0..1 for a weighted sum")
    if (method == "add_difference") != (tertiary is not None):
        raise MergeError("tertiary: add_difference needs a third checkpoint (the base of the secondary), "
                         "weighted_sum takes none")


def check_files(paths: list[Path]) -> None:
    for path in paths:
        if path.suffix.lower() != ".safetensors" or not path.is_file():
            raise MergeError(f"{path.name}: a merge reads .safetensors files only")


def merge_tensors(primary: Path, secondary: Path, tertiary: Path | None, method: str = "weighted_sum",
                  multiplier: float = 0.5, on_tensor: Callable[[int, int], None] | None = None) -> Merged:
    """The merged tensors, in the primary's order; `on_tensor(done, total)` after each tensor of the primary
    (a job's progress: raising there stops the merge, as a cancel does, before anything is written)."""
    from safetensors import safe_open

    check_request(method, multiplier, tertiary)
    paths = [Path(p) for p in (primary, secondary, tertiary) if p is not None]
    check_files(paths)
    tensors: dict[str, Any] = {}
    kept: list[str] = []
    with safe_open(str(paths[0]), "pt") as fa, safe_open(str(paths[1]), "pt") as fb:
        fc = safe_open(str(paths[2]), "pt") if tertiary is not None else None
        others = [f for f in (fb, fc) if f is not None]
        other_keys = [set(f.keys()) for f in others]
        names = list(fa.keys())
        for done, key in enumerate(names, 1):
            a = fa.get_tensor(key)
            if not a.is_floating_point() or any(key not in keys for keys in other_keys):
                tensors[key] = a                     # integer buffers (position ids) and A-only tensors
                if a.is_floating_point():
                    kept.append(key)
            else:
                b = fb.get_tensor(key)
                c = fc.get_tensor(key) if fc is not None else None
                for name, tensor in (("secondary", b), ("tertiary", c)):
                    if tensor is not None and tensor.shape != a.shape:
                        raise MergeError(f"{key}: {tuple(a.shape)} in the primary, {tuple(tensor.shape)} in the "
                                         f"{name} (checkpoints of different families or architectures)")
                tensors[key] = merged_tensor(a, b, c, method, multiplier)
            if on_tensor is not None:
                on_tensor(done, len(names))
        metadata = fa.metadata() or {}
    return Merged(tensors, {**metadata, "sdq_merge": f"{method} {multiplier}"},
                  MergeReport(len(tensors) - len(kept), kept))


def write_merged(merged: Merged, out: Path, dtype: str = "keep") -> Path:
    """Save the merge as .safetensors in `dtype` (keep: each tensor's own), written whole, then renamed into
    place (a reader never sees half a file)."""
    import torch
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise MergeError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    tensors = merged.tensors
    if dtype != "keep":
        target = getattr(torch, dtype)
        tensors = {k: v.to(target) if v.is_floating_point() else v for k, v in tensors.items()}
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial), metadata=merged.metadata)
    partial.replace(out)
    return out


def merge_files(primary: Path, secondary: Path, tertiary: Path | None, out: Path, method: str = "weighted_sum",
                multiplier: float = 0.5, dtype: str = "keep",
                on_tensor: Callable[[int, int], None] | None = None) -> MergeReport:
    """Merge single-file .safetensors checkpoints into `out` (written whole, then renamed into place)."""
    if dtype not in DTYPES:
        raise MergeError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    merged = merge_tensors(primary, secondary, tertiary, method, multiplier, on_tensor)
    write_merged(merged, out, dtype)
    return merged.report
