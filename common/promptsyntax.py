"""AUTOMATIC1111's prompt syntax: emphasis weights and BREAK, parsed into weighted fragments.

Why A1111's own algorithm and not compel (2.5.1 was evaluated): compel has
its own syntax (`word++`, `(word)1.3`, `.and()`) and its own arithmetic:
it moves a token's embedding away from the empty prompt's by the weight and
lowers weights by blending with a copy of the prompt that lacks the words.
A1111 multiplies each token's output vector by its weight, then scales the
chunk back to its original mean. A translation of the syntax would still
give other images than the web UI for the same prompt, and compel knows no
BREAK. The parser is the web UI's well-known `parse_prompt_attention`
(modules/prompt_parser.py), written again here; the chunking and weighting
live in worker/conditioning.py.

Accepted, as in A1111: `(text)` x1.1, `[text]` /1.1, `(text:1.3)` x1.3,
nesting multiplies, unbalanced brackets close at the end, `\\(` `\\)` `\\[`
`\\]` `\\\\` are literal characters, and `BREAK` (upper case, a word of its
own) starts a new 75-token chunk. Pure Python: the API uses it too (to say
when a model ignores the syntax).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

PLAIN, A1111 = "plain", "a1111"
PROMPT_SYNTAXES = (PLAIN, A1111)
# Families whose CLIP text encoders sdqueue encodes itself (chunks, weights, embeddings); SD3 and Flux
# (T5, 256-512 tokens) take the prompt as written.
WEIGHTED_FAMILIES = ("sd1", "sd2", "sdxl", "sdxl-refiner")

ROUND, SQUARE = 1.1, 1 / 1.1      # what ( ) and [ ] multiply by

_ATTENTION = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|      # escapes, and a lone backslash
\(|\[|
:\s*([+-]?[.\d]+)\s*\)|          # ":1.3)" closes a round bracket with its weight
\)|]|
[^\\()\[\]:]+|
:
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


@dataclass(frozen=True)
class Fragment:
    """A run of prompt text with one weight; `breaks` marks a BREAK (a new chunk), whose text is empty."""

    text: str
    weight: float = 1.0
    breaks: bool = False


BREAK = Fragment("", 1.0, breaks=True)


def parse_prompt(text: str) -> list[Fragment]:
    """A1111's parse: fragments in order, neighbours of equal weight merged; never empty."""
    parts: list[list] = []                # [text, weight] pairs, or BREAK
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for part in parts[start:]:
            if part is not BREAK:
                part[1] *= factor

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            parts.append([token[1:], 1.0])     # an escaped character; a lone backslash is dropped, as A1111 does
        elif token == "(":
            round_open.append(len(parts))
        elif token == "[":
            square_open.append(len(parts))
        elif weight is not None and round_open and as_number(weight) is not None:
            multiply(round_open.pop(), as_number(weight))
        elif token == ")" and round_open:
            multiply(round_open.pop(), ROUND)
        elif token == "]" and square_open:
            multiply(square_open.pop(), SQUARE)
        else:
            add_text(parts, token)
    for start in round_open:
        multiply(start, ROUND)
    for start in square_open:
        multiply(start, SQUARE)
    return merged(parts)


def add_text(parts: list, text: str) -> None:
    """Plain text, split at each BREAK."""
    for i, piece in enumerate(_BREAK.split(text)):
        if i:
            parts.append(BREAK)
        parts.append([piece, 1.0])


def as_number(text: str) -> float | None:
    """A weight as A1111's pattern accepts it ("1.3", "-.5"); None for what is not a number ("1.2.3")."""
    try:
        return float(text)
    except ValueError:
        return None


def merged(parts: list) -> list[Fragment]:
    """Fragments with neighbours of the same weight joined (A1111 tokenizes each fragment on its own)."""
    out: list[Fragment] = []
    for part in parts:
        if part is BREAK:
            out.append(BREAK)
        elif out and not out[-1].breaks and out[-1].weight == part[1]:
            out[-1] = Fragment(out[-1].text + part[0], part[1])
        else:
            out.append(Fragment(part[0], part[1]))
    return out or [Fragment("")]


def uses_syntax(text: str | None) -> bool:
    """Whether A1111's syntax would change how `text` is read: a weight other than 1, an escape or a BREAK."""
    if not text:
        return False
    fragments = parse_prompt(text)
    return any(f.breaks or f.weight != 1.0 for f in fragments) or "".join(f.text for f in fragments) != text
