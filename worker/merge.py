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
from typing import Any

METHODS = ("weighted_sum", "add_difference")
DTYPES = ("keep", "float16", "bfloat16", "float32")


class MergeError(ValueError):
    """The checkpoints cannot be merged as asked; the message names the file or tensor."""


@dataclass
class MergeReport:
    """What a merge did: tensors merged, and those kept from the primary because another file lacks them."""

    merged: int
    kept_from_primary: list[str]


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


def merge_files(primary: Path, secondary: Path, tertiary: Path | None, out: Path, method: str = "weighted_sum",
                multiplier: float = 0.5, dtype: str = "keep") -> MergeReport:
    """Merge single-file .safetensors checkpoints into `out` (written whole, then renamed into place)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    check_request(method, multiplier, tertiary)
    if dtype not in DTYPES:
        raise MergeError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    paths = [Path(p) for p in (primary, secondary, tertiary) if p is not None]
    for path in paths:
        if path.suffix.lower() != ".safetensors" or not path.is_file():
            raise MergeError(f"{path.name}: a merge reads .safetensors files only")
    result: dict[str, Any] = {}
    kept: list[str] = []
    with safe_open(str(paths[0]), "pt") as fa, safe_open(str(paths[1]), "pt") as fb:
        fc = safe_open(str(paths[2]), "pt") if tertiary is not None else None
        others = [f for f in (fb, fc) if f is not None]
        other_keys = [set(f.keys()) for f in others]
        for key in fa.keys():
            a = fa.get_tensor(key)
            if not a.is_floating_point() or any(key not in keys for keys in other_keys):
                result[key] = a                      # integer buffers (position ids) and A-only tensors
                if a.is_floating_point():
                    kept.append(key)
                continue
            b = fb.get_tensor(key)
            c = fc.get_tensor(key) if fc is not None else None
            for name, tensor in (("secondary", b), ("tertiary", c)):
                if tensor is not None and tensor.shape != a.shape:
                    raise MergeError(f"{key}: {tuple(a.shape)} in the primary, {tuple(tensor.shape)} in the {name} "
                                     "(checkpoints of different families or architectures)")
            result[key] = merged_tensor(a, b, c, method, multiplier)
        metadata = fa.metadata() or {}
    if dtype != "keep":
        target = getattr(torch, dtype)
        result = {k: v.to(target) if v.is_floating_point() else v for k, v in result.items()}
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    save_file(result, str(partial), metadata={**metadata, "sdq_merge": f"{method} {multiplier}"})
    partial.replace(out)
    return MergeReport(len(result) - len(kept), kept)
