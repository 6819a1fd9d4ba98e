"""Prompt embeddings from A1111's prompt syntax, for SD 1.x/2.x and SDXL: A1111's chunks, weights and padding.

Why our own encoding (see common/promptsyntax.py for why not compel): the
web UI's images for a prompt follow from how it builds the conditioning, so
this is its algorithm (modules/sd_hijack_clip.py, sd_emphasis.py "Original"):
- each fragment is tokenized on its own; tokens go into chunks of 75, each
  wrapped in start and end tokens and padded to 77 (after the end token
  with the tokenizer's pad token: SD 2.x's and OpenCLIP-bigG's "!");
  a chunk that fills up ends after a comma among its last 20 tokens
  (comma_padding_backtrack), BREAK ends one at once, an embedding's vectors
  never straddle two chunks;
- every chunk goes through the text encoder (SD 1.x/2.x: its last layer;
  SDXL: each encoder's penultimate layer, side by side); each token's
  output vector is multiplied by its weight, then the chunk is scaled back
  to its original mean; chunks are concatenated along the sequence;
- SDXL's pooled embedding is OpenCLIP-bigG's, from the first chunk,
  unweighted, at its end token; an empty SDXL negative prompt is zeros
  (when the model says force_zeros_for_empty_prompt, as diffusers and A1111);
- prompt and negative prompt are padded to the same number of chunks with
  the empty prompt's chunk: A1111 with "pad prompt/negative prompt to the
  same length" on (its default runs the two passes apart, which one
  batched UNet call cannot).
The result replaces the call's `prompt`/`negative_prompt` with
`prompt_embeds`/`negative_prompt_embeds` (+ the pooled pair for SDXL).
Plain prompts keep diffusers' own encoding, with embedding names rewritten
to their tokens (worker/embeddings.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from common.jobspec import JobSpec
from common.promptsyntax import A1111, Fragment, parse_prompt
from worker.embeddings import clip_encoders, token_groups, with_tokens
from worker.pipelines import family_of

CHUNK = 75                 # prompt tokens per chunk (77 with the start and end tokens)
COMMA_BACKTRACK = 20       # A1111's comma_padding_backtrack default
EMBEDDING_NAMES = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")


@dataclass
class Chunk:
    """77 token ids (start, 75 of the prompt or padding, end) and the weight of each."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Vocabulary:
    """What chunking needs of one tokenizer: its special ids, the comma, how to tokenize, the embeddings' ids."""

    start: int
    end: int
    pad: int
    comma: int | None
    tokenize: Callable[[list[str]], list[list[int]]]
    groups: dict[int, list[int]]      # an embedding's first token id -> the ids of all its vectors


def vocabulary(pipe: Any, tokenizer: Any) -> Vocabulary:
    """The Vocabulary of one of the pipeline's tokenizers (embedding names become their tokens first)."""
    def tokenize(texts: list[str]) -> list[list[int]]:
        return tokenizer([with_tokens(t, pipe) for t in texts], truncation=False, add_special_tokens=False)["input_ids"]

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    comma = tokenizer.convert_tokens_to_ids(",</w>")         # a word-final comma, as A1111 looks it up
    return Vocabulary(tokenizer.bos_token_id, tokenizer.eos_token_id, pad,
                      None if comma == tokenizer.unk_token_id else comma, tokenize, token_groups(pipe, tokenizer))


def chunk_prompt(fragments: list[Fragment], vocab: Vocabulary) -> list[Chunk]:
    """A1111's tokenize_line: the fragments' tokens in chunks of CHUNK, each wrapped and padded to CHUNK + 2."""
    chunks: list[Chunk] = []
    chunk = Chunk()
    last_comma = -1

    def close() -> None:
        nonlocal chunk, last_comma
        missing = max(0, CHUNK - len(chunk.tokens))
        chunk.tokens = [vocab.start] + chunk.tokens + [vocab.end] * (missing + 1)
        chunk.weights = [1.0] + chunk.weights + [1.0] * (missing + 1)
        end = chunk.tokens.index(vocab.end)          # after the first end token: the pad token (SD 2.x: "!")
        chunk.tokens[end + 1:] = [vocab.pad] * (len(chunk.tokens) - end - 1)
        chunks.append(chunk)
        chunk, last_comma = Chunk(), -1

    texts = [f.text for f in fragments]
    for fragment, tokens in zip(fragments, vocab.tokenize(texts)):
        if fragment.breaks:
            close()
            continue
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == vocab.comma:
                last_comma = len(chunk.tokens)
            elif len(chunk.tokens) == CHUNK and last_comma != -1 and len(chunk.tokens) - last_comma <= COMMA_BACKTRACK:
                moved, moved_weights = chunk.tokens[last_comma + 1:], chunk.weights[last_comma + 1:]
                chunk.tokens, chunk.weights = chunk.tokens[:last_comma + 1], chunk.weights[:last_comma + 1]
                close()
                chunk.tokens, chunk.weights = moved, moved_weights
            if len(chunk.tokens) == CHUNK:
                close()
            ids = vocab.groups.get(token, [token])
            if len(ids) > 1 and len(chunk.tokens) + len(ids) > CHUNK:
                close()                                  # an embedding's vectors stay in one chunk
            chunk.tokens += ids
            chunk.weights += [fragment.weight] * len(ids)
            position += 1
    if chunk.tokens or not chunks:
        close()
    return chunks


@dataclass
class Encoded:
    """A text's conditioning: [1, 77 x chunks, width] and, for SDXL, the pooled [1, width]."""

    hidden: Any
    pooled: Any = None

    @property
    def chunks(self) -> int:
        return self.hidden.shape[1] // (CHUNK + 2)


def encode_text(pipe: Any, text: str, penultimate: bool) -> Encoded:
    """One prompt in A1111's syntax through every CLIP encoder of the pipeline, weighted and concatenated."""
    import torch

    fragments = parse_prompt(text)
    hidden, pooled = [], None
    for _, tokenizer, encoder in clip_encoders(pipe):
        vocab = vocabulary(pipe, tokenizer)
        states, pooled_here = run_encoder(encoder, chunk_prompt(fragments, vocab), penultimate, vocab.end)
        hidden.append(states)
        pooled = pooled_here if pooled_here is not None else pooled
    longest = max(h.shape[1] for h in hidden)
    if any(h.shape[1] != longest for h in hidden):      # tokenizers that chunk alike never get here
        raise ValueError("the text encoders' tokenizers split the prompt into different numbers of chunks")
    return Encoded(torch.cat(hidden, dim=-1), pooled)


def run_encoder(encoder: Any, chunks: list[Chunk], penultimate: bool, end: int) -> tuple[Any, Any]:
    """Each chunk through one text encoder, weighted with the mean kept (A1111's "Original" emphasis);
    the pooled embedding of the first chunk when the encoder projects one (SDXL's OpenCLIP-bigG)."""
    import torch

    ids = torch.tensor([c.tokens for c in chunks], device=encoder.device)
    weights = torch.tensor([c.weights for c in chunks], device=encoder.device, dtype=torch.float32)
    with torch.no_grad():
        output = encoder(ids, output_hidden_states=penultimate)
        states = output.hidden_states[-2] if penultimate else output.last_hidden_state
        weighted = emphasised(states.float(), weights).to(states.dtype)
        pooled = None
        if hasattr(encoder, "text_projection"):         # at the first end token, as A1111 takes it
            first_end = int(chunks[0].tokens.index(end))
            pooled = encoder.text_projection(output.last_hidden_state[:1, first_end])
    return weighted.reshape(1, -1, weighted.shape[-1]), pooled


def emphasised(states: Any, weights: Any) -> Any:
    """Each token's vector times its weight, each chunk then scaled back to its own mean."""
    import torch

    before = states.mean(dim=(1, 2), keepdim=True)
    weighted = states * weights.unsqueeze(-1)
    after = weighted.mean(dim=(1, 2), keepdim=True)
    scale = torch.where(after != 0, before / after, torch.ones_like(after))   # a vanished mean: left as it is
    return weighted * scale


def padded(encoded: Encoded, chunks: int, empty: Encoded) -> Any:
    """The conditioning lengthened to `chunks` chunks with the empty prompt's chunk (A1111's pad_cond)."""
    import torch

    missing = chunks - encoded.chunks
    return torch.cat([encoded.hidden] + [empty.hidden] * missing, dim=1) if missing > 0 else encoded.hidden


def prompt_embeddings(pipe: Any, prompt: str, negative: str | None) -> dict[str, Any]:
    """prompt_embeds and negative_prompt_embeds (SDXL: + the pooled pair) for one text pair, equally long."""
    import torch

    penultimate = family_of(pipe).penultimate
    empty = encode_text(pipe, "", penultimate)
    positive = encode_text(pipe, prompt, penultimate)
    zeros = penultimate and not negative and getattr(pipe.config, "force_zeros_for_empty_prompt", False)
    if zeros:
        uncond = Encoded(torch.zeros_like(empty.hidden), torch.zeros_like(empty.pooled))
    else:
        uncond = empty if not negative else encode_text(pipe, negative, penultimate)
    chunks = max(positive.chunks, uncond.chunks)
    embeds = {"prompt_embeds": padded(positive, chunks, empty), "negative_prompt_embeds": padded(uncond, chunks, empty)}
    if penultimate:
        embeds.update(pooled_prompt_embeds=positive.pooled, negative_pooled_prompt_embeds=uncond.pooled)
    return embeds


def conditioned(pipe: Any, spec: JobSpec, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments with the job's prompts as its syntax asks: A1111's syntax as prompt embeddings,
    plain text as diffusers takes it (embedding names as their tokens); SD3 and Flux: as written."""
    if not clip_encoders(pipe):
        return kwargs
    if spec.prompt_syntax == A1111:
        texts = {name: kwargs[name] for name in ("prompt", "negative_prompt") if name in kwargs}
        rest = {name: value for name, value in kwargs.items() if name not in texts}
        return {**rest, **prompt_embeddings(pipe, texts.get("prompt") or "", texts.get("negative_prompt"))}
    return {**kwargs, **{name: with_tokens(kwargs[name], pipe) for name in ("prompt", "negative_prompt")
                         if isinstance(kwargs.get(name), str)}}
