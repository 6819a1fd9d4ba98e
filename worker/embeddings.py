"""Textual inversion embeddings in a warm pipeline: loaded once per model, kept in step with the folder.

Why tokens of our own: each embedding is added to the model's tokenizer(s)
and text encoder(s) by diffusers' `load_textual_inversion`, under an
internal token (`<emb3>`, and `<emb3>_1`.. for its other vectors), not
under its name. A prompt's words are matched to names here, as A1111
matches them: case-insensitively and as whole words. Under the bare name,
the tokenizer would also split it out of longer words (`style` in
`lifestyle`), and diffusers' multi-vector expansion misses names with
capitals. The internal tokens are plain lower-case words diffusers expands
right, so the same rewrite serves plain prompts (diffusers encodes them)
and A1111 prompts (worker/conditioning.py).

Loading resizes each text encoder's token embedding once per embedding (a
new storage for that one matrix, before the jobs that use it, in the
model's own dtype); every other weight, and every view on the pipeline,
stays shared as it was (tests/test_embeddings.py checks data_ptr and dtype).
Tokens live in that pipeline's own tokenizer objects, never another model's.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.embeddings import embedding_parts
from worker.pipelines import family_of

log = logging.getLogger("sdqueue.worker")
STATE = "sdq_embeddings"      # pipeline attribute holding its EmbeddingState
LETTER = r"[^\W\d_]"          # a name is a whole word: no letter right before or after it


@dataclass
class Loaded:
    """One embedding in the pipeline: its internal token and how many vectors (tokens) it has."""

    token: str
    vectors: int


@dataclass
class EmbeddingState:
    """What a pipeline holds: embeddings by name, the files' (size, mtime) last seen, why others were skipped."""

    loaded: dict[str, Loaded] = field(default_factory=dict)
    seen: dict[str, tuple[int, int]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    added: int = 0                                  # internal tokens handed out (never reused)
    pattern: re.Pattern | None = None               # the loaded names, longest first
    by_word: dict[str, Loaded] = field(default_factory=dict)

    def index(self) -> None:
        """Rebuild the name matcher after the loaded set changed."""
        names = sorted(self.loaded, key=len, reverse=True)
        self.by_word = {name.lower(): self.loaded[name] for name in reversed(names)}
        self.pattern = re.compile("|".join(rf"(?<!{LETTER}){re.escape(n)}(?!{LETTER})" for n in names),
                                  re.IGNORECASE) if names else None


def state_of(pipe: Any) -> EmbeddingState:
    """The pipeline's embedding state (empty until sync_embeddings runs)."""
    state = getattr(pipe, STATE, None)
    if state is None:
        state = EmbeddingState()
        setattr(pipe, STATE, state)
    return state


def clip_encoders(pipe: Any) -> list[tuple[str, Any, Any]]:
    """(embedding part, tokenizer, text encoder) of each CLIP encoder the pipeline has (its family's list,
    less those it lacks: the SDXL refiner has OpenCLIP-bigG only); [] for SD3 and Flux."""
    found = []
    for part, tokenizer_name, encoder_name in family_of(pipe).clip_encoders:
        tokenizer, encoder = getattr(pipe, tokenizer_name, None), getattr(pipe, encoder_name, None)
        if tokenizer is not None and encoder is not None:
            found.append((part, tokenizer, encoder))
    return found


def signature(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def sync_embeddings(pipe: Any, files: dict[str, Path]) -> EmbeddingState:
    """Load the folder's embeddings that fit this pipeline and are new or changed since the last call; forget
    removed ones. Cheap when nothing changed (a stat per file): the worker calls it before every job."""
    state = state_of(pipe)
    encoders = clip_encoders(pipe)
    if not encoders:
        return state
    changed = False
    for name in [n for n in state.seen if n not in files]:
        state.seen.pop(name)
        state.skipped.pop(name, None)
        changed |= state.loaded.pop(name, None) is not None
    for name, path in files.items():
        try:
            current = signature(path)
        except OSError:
            continue
        if state.seen.get(name) == current:
            continue
        state.seen[name] = current
        changed |= state.loaded.pop(name, None) is not None   # a changed file comes back under a new token
        state.skipped.pop(name, None)
        try:
            state.loaded[name] = load_embedding(pipe, encoders, state, path)
            changed = True
        except Exception as exc:  # noqa: BLE001 - one broken file (torch.load raises anything) never stops the model
            state.skipped[name] = f"{type(exc).__name__}: {exc}"
            log.info("embedding %s not loaded for %s: %s", name, type(pipe).__name__, exc)
    if changed:
        state.index()
    return state


def read_vectors(path: Path) -> dict[str, Any]:
    """The file's vectors by part (common/embeddings.py tells the formats apart), as float32 tensors."""
    import torch

    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        data = load_file(str(path), device="cpu")
    else:
        # weights_only: plain tensors and dicts; ParameterDict for files of the original textual inversion trainer.
        with torch.serialization.safe_globals([torch.nn.ParameterDict]):
            data = torch.load(path, map_location="cpu", weights_only=True)
    parts = embedding_parts(data)
    return {part: torch.atleast_2d(vectors.detach().float()) for part, vectors in parts.items()}


def load_embedding(pipe: Any, encoders: list[tuple[str, Any, Any]], state: EmbeddingState, path: Path) -> Loaded:
    """Add one file's vectors to each encoder under a new internal token; ValueError when it does not fit."""
    parts = read_vectors(path)
    for part, tokenizer, encoder in encoders:
        width = encoder.get_input_embeddings().weight.shape[-1]
        if part not in parts:
            kind = "an SDXL pair (clip_l + clip_g)" if "clip_l" in parts else "one tensor (SD 1.x/2.x)"
            raise ValueError(f"{kind} does not fit this model's text encoders")
        if parts[part].shape[-1] != width:
            raise ValueError(f"{part or 'its'} vectors are {parts[part].shape[-1]} wide, the text encoder {width}")
    token = f"<emb{state.added}>"
    state.added += 1
    for part, tokenizer, encoder in encoders:
        pipe.load_textual_inversion(parts[part], token=token, tokenizer=tokenizer, text_encoder=encoder)
    return Loaded(token, int(parts[encoders[0][0]].shape[0]))


def with_tokens(text: str | None, pipe: Any) -> str | None:
    """`text` with each embedding name replaced by its internal token (nothing to do without embeddings)."""
    state = getattr(pipe, STATE, None)
    if not text or state is None or state.pattern is None:
        return text
    return state.pattern.sub(lambda match: state.by_word[match.group(0).lower()].token, text)


def token_groups(pipe: Any, tokenizer: Any) -> dict[int, list[int]]:
    """First token id of each embedding -> the ids of all its vectors, in this tokenizer."""
    state = getattr(pipe, STATE, None)
    if state is None:
        return {}
    groups = {}
    for loaded in state.loaded.values():
        names = [loaded.token] + [f"{loaded.token}_{i}" for i in range(1, loaded.vectors)]
        ids = tokenizer.convert_tokens_to_ids(names)
        groups[ids[0]] = ids
    return groups
