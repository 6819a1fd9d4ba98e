"""Warm pipelines, one per model, kept in memory between jobs (bounded LRU).

Why: loading a checkpoint takes seconds to minutes; a worker loads its
default model once at start and keeps the few most recently used models
warm, so a request pays only for denoising. How a model loads (dtype,
folder or single file) is its family's business: worker/pipelines.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

from common.catalog import ModelInfo
from common.embeddings import list_embeddings
from worker.embeddings import sync_embeddings
from worker.metrics import observe_model_load
from worker.pipelines import family_for
from worker.pipelines.base import resolve_dtype
from worker.speedups import Speedups, apply_speedups

log = logging.getLogger("sdqueue.worker")


def load_pipeline(model: ModelInfo, device: str, single_file_config: Path | None, dtype: str = "auto",
                  speedups: Speedups | None = None, embeddings_dir: Path | None = None) -> Any:
    """Load one model onto `device` the way its family loads it (worker/pipelines), in `dtype` (worker.dtype),
    with the textual inversion embeddings of `embeddings_dir` that fit it (worker/embeddings.py) and the
    worker's speed-ups applied once (worker/speedups.py)."""
    family = family_for(model)
    pipe = family.load(model, device, single_file_config, resolve_dtype(dtype, family, device))
    if embeddings_dir is not None:
        sync_embeddings(pipe, list_embeddings(embeddings_dir))
    return apply_speedups(pipe, speedups or Speedups())


class PipelineRegistry:
    """Model name -> warm pipeline, least recently used evicted beyond `capacity`."""

    def __init__(self, capacity: int, loader: Callable[[str], Any]):
        self.capacity = max(1, capacity)
        self._loader = loader
        self._pipes: OrderedDict[str, Any] = OrderedDict()
        self.loads = 0
        self.load_seconds = 0.0

    def names(self) -> list[str]:
        """Models held warm, least recently used first."""
        return list(self._pipes)

    def names_after(self, name: str) -> list[str]:
        """The models held once `name` has been used (loaded, evicting the least recently used)."""
        names = [n for n in self._pipes if n != name] + [name]
        return names[-self.capacity:]

    def get(self, name: str, keep: tuple[str, ...] = ()) -> Any:
        """The warm pipeline for `name`, loading (and evicting) as needed.

        `keep`: models the running job still uses (an SDXL base while its
        refiner loads): never evicted, even beyond capacity for a while.
        """
        if name in self._pipes:
            self._pipes.move_to_end(name)
            return self._pipes[name]
        while len(self._pipes) >= self.capacity:
            evicted = next((n for n in self._pipes if n not in keep), None)
            if evicted is None:
                break
            del self._pipes[evicted]          # drop the only reference before freeing memory
            log.info("evicting model %s", evicted)
            self._free_memory()
        started = time.perf_counter()
        pipe = self._loader(name)
        seconds = time.perf_counter() - started
        self.loads += 1
        self.load_seconds += seconds
        observe_model_load(name, seconds)
        log.info("loaded model %s in %.2fs", name, seconds, extra={"model": name, "load_seconds": round(seconds, 3)})
        self._pipes[name] = pipe
        return pipe

    @staticmethod
    def _free_memory() -> None:
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
